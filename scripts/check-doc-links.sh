#!/usr/bin/env bash
# Check that every relative link in the Markdown docs resolves: the file (or
# directory) exists, and a #fragment names a heading of the target file
# (GitHub's anchor rules). External links (http:, https:, mailto:) are not
# fetched. Usage: scripts/check-doc-links.sh [FILE.md ...]
# (default: README.md, docs/*.md, bench/*.md, tuning.md, clients/js/README.md).
# Exit status 1 if any link is broken, listing each as FILE:LINE: LINK.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
    set -- README.md docs/*.md bench/*.md tuning.md clients/js/README.md
fi
exec python3 - "$@" <<'PY'
import os, re, sys

def anchors(path, cache={}):
    """GitHub-style heading anchors of a Markdown file (outside code fences)."""
    if path not in cache:
        seen, out, fence = {}, set(), False
        for line in open(path, encoding="utf-8"):
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if not m:
                continue
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # [t](u) -> t
            slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        cache[path] = out
    return cache[path]

link = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
bad = checked = 0
for md in sys.argv[1:]:
    fence = False
    for no, line in enumerate(open(md, encoding="utf-8"), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        line = re.sub(r"`[^`]*`", "``", line)  # code spans are not links
        for target in link.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # external
            checked += 1
            path, _, frag = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
            ok = os.path.exists(dest)
            if ok and frag and dest.endswith(".md"):
                ok = frag in anchors(dest)
            if not ok:
                bad += 1
                print(f"{md}:{no}: {target}")
print(f"check-doc-links: {checked} relative links in {len(sys.argv) - 1} files, {bad} broken")
sys.exit(1 if bad else 0)
PY
