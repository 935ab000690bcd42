//! Thread priorities for probes that measure the node while a load runs on
//! the same two cores: the probe must not be what is late.

/// Runs the calling thread (a prober, which mostly sleeps) under
/// SCHED_FIFO, so that on this 2-core box the CPU a load takes (its
/// loopback traffic is kernel work on the same cores) cannot keep the
/// prober itself from running: what is measured is the node. Checked: with
/// a prober at nice -15 the epoll-driver runs showed 0.4-0.8 s of
/// consecutive late pings while the attacker drained its responses; at
/// SCHED_FIFO, none (worst 12-17 ms). Needs root (CI is root); without it,
/// falls back to nice -15 and the test measures as it can.
pub fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall about the calling thread; `param` outlives it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        nice(-15);
    }
}

/// Sets the calling thread's nice value (Linux: per thread).
pub fn nice(n: i32) {
    // SAFETY: plain syscalls about the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, n);
    }
}
