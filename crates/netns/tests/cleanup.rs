//! A run's namespaces, links, hosts files and processes, and their removal: on
//! drop, and by a sweep of a dead run's leftovers. Needs root.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use isthmus_netns::{Net, Options, sweep};

/// The tag of this test's runs: no other user of the crate sweeps it.
const TAG: &str = "ixt";
const NOBODY: u32 = 65534;

fn root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "not running as root: these tests create network namespaces; run them as root"
    );
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for this purpose: it runs nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
}

#[test]
fn a_dropped_run_leaves_no_namespace_hosts_file_or_process() {
    root();
    let net = Net::create(Options::new(TAG)).expect("a run");
    let a = net.namespace("a").expect("namespace a");
    let b = net.namespace("b").expect("namespace b");
    let (ifa, ifb) = net.veth(&a, &b).expect("a veth pair");
    a.add_addr(&ifa, "198.18.0.1/24").expect("address in a");
    b.add_addr(&ifb, "198.18.0.2/24").expect("address in b");
    b.write_hosts("198.18.0.1 peer\n").expect("hosts file");

    // Traffic crosses the pair, and only inside the run.
    let listener = b
        .run(|| TcpListener::bind("198.18.0.2:0"))
        .expect("listen in b");
    let port = listener.local_addr().expect("bound").port();
    a.run(|| {
        TcpStream::connect_timeout(
            &format!("198.18.0.2:{port}").parse().expect("addr"),
            Duration::from_secs(5),
        )
    })
    .expect("a reaches b over the pair");
    assert!(
        b.exec("cat", &["/etc/hosts"])
            .expect("cat")
            .contains("peer"),
        "ip netns exec sees the run's hosts file"
    );

    // A process under another UID, never adopted: the drop stops it all the same.
    let mut sleep = Command::new("sleep");
    sleep.arg("60");
    let child = a.spawn_as(sleep, NOBODY, NOBODY).expect("sleep in a");
    let pid = child.id();
    assert!(a.pids().contains(&(pid as i32)), "the process runs in a");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "{status}"
    );

    let names = [a.name().to_owned(), b.name().to_owned()];
    drop(net);
    let left = namespaces();
    for name in &names {
        assert!(!left.contains(name.as_str()), "{name} is left: {left}");
        assert!(
            !Path::new("/etc/netns").join(name).exists(),
            "hosts of {name} left"
        );
    }
    // The child is ours to reap; until then it is a zombie, not a process.
    let mut child = child;
    let _ = child.wait();
    assert!(!alive(pid), "sleep {pid} survived its namespace");
}

#[test]
fn a_sweep_removes_what_a_dead_run_left_and_keeps_live_runs() {
    root();
    // A pid above the kernel's maximum (2^22) never runs.
    let dead = format!("{TAG}{:x}-left", 0x3ff_ffff);
    let live_net = Net::create(Options::new(TAG)).expect("a live run");
    let live = live_net.namespace("kept").expect("a live namespace");
    Command::new("ip")
        .args(["netns", "add", &dead])
        .status()
        .expect("ip netns add");
    std::fs::create_dir_all(Path::new("/etc/netns").join(&dead)).expect("hosts dir");

    let swept = sweep(TAG, None, false, |_| true);
    assert!(
        swept.removed.contains(&format!("{TAG}{:x}", 0x3ff_ffff)),
        "{swept:?}"
    );
    let left = namespaces();
    assert!(!left.contains(&dead), "{dead} is left: {left}");
    assert!(!Path::new("/etc/netns").join(&dead).exists());
    // This process's own run is alive, whatever other tests do meanwhile.
    assert!(
        left.contains(live.name()),
        "{} was swept: {left}",
        live.name()
    );
}
