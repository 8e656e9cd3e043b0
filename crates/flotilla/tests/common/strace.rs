//! Holding a member's disk with strace, as a hung disk would (every fsync of the process is
//! stopped at its entry until the tracer is killed), or one of its threads: the test reads in
//! /proc where each thread is, so nothing about the stall is judged by time.

use std::path::Path;
use std::time::Duration;

use super::{Process, eventually};

/// A member process whose fsyncs strace holds, from the moment its WAL thread is traced until
/// [`HeldDisk::release`] (or the drop, which kills strace and so lets them go).
pub struct HeldDisk {
    pub pid: i32,
    /// The member's WAL thread.
    pub wal: i32,
    tracer: Process,
}

impl HeldDisk {
    /// Holds `pid`'s fsyncs; returns once strace is attached to its WAL thread.
    pub async fn hold(pid: i32, out: &Path, limit: Duration) -> HeldDisk {
        let wal = thread_named(pid, "flotilla-wal").expect("the member has a WAL thread");
        let tracer = hold_fsyncs(pid, out);
        eventually("strace to attach to the WAL thread", limit, || async {
            traced(pid, wal).then_some(())
        })
        .await;
        HeldDisk { pid, wal, tracer }
    }

    /// The WAL thread is stopped in `fdatasync` now.
    pub fn holding(&self) -> bool {
        held_in_fdatasync(self.pid, self.wal)
    }

    /// Waits until the WAL thread is held in `fdatasync`.
    pub async fn wait_holding(&self, limit: Duration) {
        eventually("the WAL thread to be held in fdatasync", limit, || async {
            self.holding().then_some(())
        })
        .await;
    }

    /// Lets the disk go: strace is killed, the kernel detaches it from every thread, and the
    /// held fsync runs. (Interrupting strace instead, so that it detaches itself, was once
    /// seen to leave a fsync held for the whole injected delay.)
    pub async fn release(self, limit: Duration) {
        let HeldDisk { pid, wal, tracer } = self;
        drop(tracer);
        eventually("the held fsync to finish", limit, || async {
            (!held_in_fdatasync(pid, wal)).then_some(())
        })
        .await;
    }
}

/// Starts strace holding every fdatasync and fsync of `pid`'s threads at their entry (for at
/// most 60 s each) until it is killed (the kernel then detaches it and lets them go); what it traced goes to
/// `out`. Killed by PID when dropped.
pub fn hold_fsyncs(pid: i32, out: &std::path::Path) -> Process {
    let child = std::process::Command::new("strace")
        .args(["-f", "-qq", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .args(["-e", "trace=fdatasync,fsync"])
        .args(["-e", "inject=fdatasync,fsync:delay_enter=60000000"])
        .spawn()
        .expect("strace (apt-get install strace)");
    Process { child }
}

/// The id of `pid`'s thread called `name`.
pub fn thread_named(pid: i32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .find(|tid: &i32| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
}

fn task_file(pid: i32, tid: i32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{file}")).unwrap_or_default()
}

/// The thread has a tracer.
pub fn traced(pid: i32, tid: i32) -> bool {
    task_file(pid, tid, "status")
        .lines()
        .any(|line| line.starts_with("TracerPid:") && line.split_whitespace().nth(1) != Some("0"))
}

/// The thread is stopped by its tracer inside `fdatasync`.
pub fn held_in_fdatasync(pid: i32, tid: i32) -> bool {
    #[cfg(target_arch = "x86_64")]
    const FDATASYNC: &str = "75";
    #[cfg(target_arch = "aarch64")]
    const FDATASYNC: &str = "83";
    let stopped = tracing_stop(pid, tid);
    let in_fdatasync = task_file(pid, tid, "syscall").split_whitespace().next() == Some(FDATASYNC);
    stopped && in_fdatasync
}

/// One thread of a member process that strace holds at the entry of its next system call
/// (whatever it is) until [`HeldThread::release`] or the drop kills strace. Only that thread
/// is traced: the rest of the process runs on.
pub struct HeldThread {
    pub pid: i32,
    pub tid: i32,
    tracer: Process,
}

impl HeldThread {
    /// Holds `pid`'s thread called `name`; returns once strace is attached to it.
    pub async fn hold(pid: i32, name: &str, out: &Path, limit: Duration) -> HeldThread {
        let tid = thread_named(pid, name).unwrap_or_else(|| panic!("no thread named {name}"));
        let child = std::process::Command::new("strace")
            .args(["-qq", "-p", &tid.to_string(), "-o"])
            .arg(out)
            .args(["-e", "inject=all:delay_enter=60000000"])
            .spawn()
            .expect("strace (apt-get install strace)");
        let tracer = Process { child };
        eventually("strace to attach to the thread", limit, || async {
            traced(pid, tid).then_some(())
        })
        .await;
        HeldThread { pid, tid, tracer }
    }

    /// Waits until the thread is stopped by its tracer (held in a system call's entry).
    pub async fn wait_holding(&self, limit: Duration) {
        eventually("the thread to be held by strace", limit, || async {
            tracing_stop(self.pid, self.tid).then_some(())
        })
        .await;
    }

    /// The thread is stopped by its tracer now.
    pub fn holding(&self) -> bool {
        tracing_stop(self.pid, self.tid)
    }

    /// Lets the thread go (strace is killed; the kernel detaches it).
    pub async fn release(self, limit: Duration) {
        let HeldThread { pid, tid, tracer } = self;
        drop(tracer);
        eventually("the held thread to run again", limit, || async {
            (!traced(pid, tid)).then_some(())
        })
        .await;
    }
}

/// The thread is stopped by its tracer.
fn tracing_stop(pid: i32, tid: i32) -> bool {
    task_file(pid, tid, "status")
        .lines()
        .any(|line| line.starts_with("State:") && line.contains("tracing stop"))
}
