//! Which monoio driver served a test: scripts/test.sh runs the socket-level
//! tests once with `CORECAST_TEST_DRIVER=uring` and once with `legacy`, and
//! this test fails if the node did not run the driver asked for (so an
//! io_uring regression cannot hide behind the epoll fallback).

mod common;

use common::{start_server, test_driver};

/// The `driver` label of `corecast_info`.
fn served_by(s: &common::Server) -> String {
    let m = s.metrics();
    let line = m.lines().find(|l| l.starts_with("corecast_info{")).expect("corecast_info");
    let at = line.find("driver=\"").expect("driver label") + 8;
    line[at..].split('"').next().unwrap().to_string()
}

#[test]
fn the_driver_in_metrics_is_the_one_asked_for() {
    match test_driver().as_deref() {
        // start_server passes --driver from the environment.
        Some("uring") => assert_eq!(served_by(&start_server(&[])), "io_uring"),
        Some("legacy") => assert_eq!(served_by(&start_server(&[])), "epoll"),
        Some(other) => panic!("CORECAST_TEST_DRIVER={other}: expected uring or legacy"),
        None => {
            assert_eq!(served_by(&start_server(&["--driver", "uring"])), "io_uring");
            assert_eq!(served_by(&start_server(&["--driver", "legacy"])), "epoll");
        }
    }
}
