//! A child process of the end-to-end tests or the benchmark: started from
//! a recipe (so that it can be started again), its output in a log file,
//! stopped with SIGTERM or killed with SIGKILL, measured from `/proc`.
//! One harness for both, so that a test and a benchmark run a service the
//! same way. Linux only (`/proc`, `kill`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a process is started, again on each restart.
pub type Recipe = Box<dyn Fn() -> Command + Send + Sync>;

/// A child process; killed when dropped.
pub struct Process {
    pub name: String,
    /// Its stdout and stderr: a new file at the start, appended to by restarts.
    pub log: PathBuf,
    recipe: Recipe,
    child: Mutex<Option<Child>>,
}

impl Process {
    /// Starts `recipe()` as `name`, its output going to `<dir>/<name>.log`.
    pub fn start(name: &str, dir: &Path, recipe: Recipe) -> std::io::Result<Process> {
        let p = Process {
            name: name.to_owned(),
            log: dir.join(format!("{name}.log")),
            recipe,
            child: Mutex::new(None),
        };
        p.run(File::create(&p.log)?)?;
        Ok(p)
    }

    /// Starts the process again, appending to its log (a running one is
    /// killed first).
    pub fn restart(&self) -> std::io::Result<()> {
        self.kill9();
        self.run(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)?,
        )
    }

    fn run(&self, log: File) -> std::io::Result<()> {
        let child = (self.recipe)()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("start {}: {e}", self.name)))?;
        *self.lock() = Some(child);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// `kill -9`, and waits for the exit.
    pub fn kill9(&self) {
        if let Some(mut c) = self.lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, without waiting.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            sigterm(pid);
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; SIGKILL after.
    /// Whether it exited in time.
    pub fn stop_within(&self, within: Duration) -> bool {
        let Some(mut c) = self.lock().take() else {
            return true;
        };
        sigterm(c.id());
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// [`Process::stop_within`] 30 s.
    pub fn stop(&self) {
        if !self.stop_within(Duration::from_secs(30)) {
            eprintln!("{} did not stop within 30 s; killed", self.name);
        }
    }

    pub fn is_running(&self) -> bool {
        self.exited().is_none()
    }

    /// None while it runs; how it ended once it did.
    pub fn exited(&self) -> Option<String> {
        match self.lock().as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => None,
            Some(Ok(Some(s))) => Some(s.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => Some("stopped".into()),
        }
    }

    /// Its peak resident set size so far (`VmHWM`), in bytes; `None` when
    /// it is not running.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time (user and system) used so far, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        cpu_secs(self.pid()?)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// What `/proc/<pid>/stat` says of a process: its parent, and its CPU
/// ticks (USER_HZ, 100 a second on Linux): its own user and system time,
/// then that of the children it has waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub ticks: [u64; 2],
    pub children_ticks: [u64; 2],
}

/// A process's [`Stat`], if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        ticks: [n(11)?, n(12)?],
        children_ticks: [n(13)?, n(14)?],
    })
}

/// CPU time (user and system) a process has used, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = stat(pid)?;
    Some((s.ticks[0] + s.ticks[1]) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> Recipe {
        Box::new(|| {
            let mut c = Command::new("sh");
            c.args(["-c", "echo started; exec sleep 60"]);
            c
        })
    }

    /// Waits (10 s at most) until the log has `n` lines.
    fn wait_for_lines(p: &Process, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.log_tail(n).lines().count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_process_is_stopped_killed_and_started_again() {
        let dir = std::env::temp_dir().join(format!("dualwrite-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Process::start("sleeper", &dir, sleeper()).unwrap();
        wait_for_lines(&p, 1);
        assert!(p.is_running());
        assert!(p.peak_rss().is_some_and(|b| b > 0));
        p.kill9();
        assert_eq!(p.exited().as_deref(), Some("stopped"));
        p.restart().unwrap();
        wait_for_lines(&p, 2);
        assert!(p.is_running());
        let pid = p.pid().unwrap();
        assert!(
            p.stop_within(Duration::from_secs(10)),
            "sleep ends on SIGTERM"
        );
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        // Both starts wrote to one log.
        assert_eq!(p.log_tail(5), "started\nstarted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
