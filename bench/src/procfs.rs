//! Process accounting from outside and inside: the server's resident memory
//! (`/proc/<pid>/status` VmRSS) and CPU time (`/proc/<pid>/stat` utime +
//! stime, all threads, with stime also apart: on loopback most of a
//! delivery's server CPU is the kernel's TCP work), the generator's own CPU time (`getrusage`), the open
//! files limit, and a monotonic clock shared by all worker processes.

use std::io;

/// One look at a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    pub rss_kb: u64,
    /// User + system.
    pub cpu_s: f64,
    /// System (kernel) alone.
    pub sys_s: f64,
}

/// Samples `pid`'s RSS and CPU time.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = |what| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/{what}: unexpected format"));
    let rss_kb = parse_vmrss_kb(&status).ok_or_else(|| bad("status"))?;
    let (utime, stime) = parse_stat_cpu_ticks(&stat).ok_or_else(|| bad("stat"))?;
    let hz = clock_ticks_per_sec();
    Ok(ProcSample { rss_kb, cpu_s: (utime + stime) as f64 / hz, sys_s: stime as f64 / hz })
}

/// Sums [`sample`] over several pids (e.g. two server nodes).
pub fn sample_all(pids: &[u32]) -> io::Result<ProcSample> {
    let mut total = ProcSample::default();
    for &pid in pids {
        let s = sample(pid)?;
        total.rss_kb += s.rss_kb;
        total.cpu_s += s.cpu_s;
        total.sys_s += s.sys_s;
    }
    Ok(total)
}

/// `VmRSS:   123456 kB` → 123456.
fn parse_vmrss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()
}

/// (utime, stime) (fields 14 and 15 of `/proc/<pid>/stat`), in clock ticks.
/// The command name (field 2) is in parentheses and may hold spaces or `)`,
/// so fields are counted from the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is index 0, so utime (14) is index 11.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// USER_HZ: the unit of utime and stime in `/proc/<pid>/stat`.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: plain get/setrlimit on a struct we own.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// CLOCK_MONOTONIC in nanoseconds. It is one clock for every process on the
/// host, so a send time stamped by one worker can be subtracted from a
/// receive time in another.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: CLOCK_MONOTONIC always exists on Linux; ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPUs this process may run on (respects `taskset`).
pub fn cores_available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_survives_spaces_and_parens_in_the_name() {
        let stat = "4242 (my (odd) srv) S 1 4242 4242 0 -1 4194560 500 0 0 0 731 269 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some((731, 269)));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parens"), None);
    }

    #[test]
    fn vmrss_is_read_in_kb() {
        let status = "Name:\tcorecast\nVmPeak:\t  999 kB\nVmRSS:\t   51234 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kb(status), Some(51234));
        assert_eq!(parse_vmrss_kb("Name:\tzombie\n"), None);
    }

    #[test]
    fn own_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kb > 0);
        assert!(s.cpu_s >= s.sys_s && s.sys_s >= 0.0);
        let before = now_ns();
        assert!(now_ns() >= before);
    }
}
