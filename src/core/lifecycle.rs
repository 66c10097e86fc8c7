//! When a copy of an image may leave this node's disk. Pure decisions over facts the
//! node gathers (open handles on the mount, the last use, the ready copies peers report,
//! the minimum the cluster keeps), so every rule is tested without a mount.
//!
//! - In use: a handle open through the mount (qemu and loop devices hold one), a read or
//!   a peer's fetch within the cleanup wait.
//! - The cluster keeps at least `max(1, minNumberOfCopies)` ready copies. Which nodes keep
//!   them is decided without a leader: the ready holders ordered by a hash of the image
//!   name and node id; the first `needed` of them are the keepers and never remove their
//!   copy by themselves. Every node computes the same order from the same reports, so two
//!   nodes never both remove the last copies (a node that cannot see its peers sees
//!   fewer copies elsewhere and keeps its own).

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::store::State;

/// How a copy is used: handles open through the mount (file handle -> the pid that
/// opened it) and when it was last opened, closed or served to a peer.
#[derive(Debug)]
pub struct Usage {
    handles: std::sync::Mutex<std::collections::BTreeMap<u64, u32>>,
    last: std::sync::Mutex<std::time::Instant>,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            handles: Default::default(),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Usage {
    pub fn opened(&self, fh: u64, pid: u32) {
        self.handles.lock().unwrap().insert(fh, pid);
        self.touch();
    }

    pub fn closed(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
        self.touch();
    }

    pub fn open_pids(&self) -> Vec<u32> {
        self.handles.lock().unwrap().values().copied().collect()
    }

    pub fn touch(&self) {
        *self.last.lock().unwrap() = std::time::Instant::now();
    }

    pub fn idle(&self) -> Duration {
        self.last.lock().unwrap().elapsed()
    }
}

/// What the node knows about one copy on this node.
#[derive(Debug, Clone)]
pub struct CopyFacts {
    pub name: String,
    pub state: State,
    /// Handles open through the mount now, with the pids that opened them.
    pub open_pids: Vec<u32>,
    /// Since the last open, close, read or peer fetch.
    pub idle: Duration,
    /// This node's id, and the peers holding a ready copy (same version): their node ids
    /// and whether their copy is in use.
    pub node_id: String,
    pub ready_elsewhere: Vec<(String, bool)>,
    /// `minNumberOfCopies` (0: the node default).
    pub min_copies: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Remove,
    Keep(String),
}

/// Why a copy cannot leave now: what holds it, or None.
pub fn holder(f: &CopyFacts) -> Option<String> {
    if f.open_pids.is_empty() {
        return None;
    }
    let pids: Vec<String> = f.open_pids.iter().map(|p| describe_pid(*p)).collect();
    Some(format!(
        "{} open handle(s) on the mount ({})",
        f.open_pids.len(),
        pids.join(", ")
    ))
}

/// `pid 123 (qemu-img)`, or a hint when the process is gone (a loop device keeps the
/// handle of the `losetup` that opened it).
fn describe_pid(pid: u32) -> String {
    // FUSE names the thread that opened the file: report its process.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    match (field("Tgid:"), field("Name:")) {
        (Some(tgid), Some(_)) => {
            let comm = std::fs::read_to_string(format!("/proc/{tgid}/comm")).unwrap_or_default();
            format!("pid {tgid} ({})", comm.trim())
        }
        _ => format!("pid {pid}, exited: a loop device may hold it (`losetup -a`)"),
    }
}

/// The copies the cluster must keep: at least one.
pub fn needed(min_copies: u32, node_default: u32) -> usize {
    (if min_copies == 0 {
        node_default
    } else {
        min_copies
    })
    .max(1) as usize
}

/// Whether this node is among the `needed` keepers of `name` (see the module comment):
/// copies in use come first (they stay anyway), then the order of a hash of name and id.
pub fn is_keeper(f: &CopyFacts, needed: usize) -> bool {
    let key = |id: &str, in_use: bool| -> (bool, [u8; 32]) {
        (!in_use, Sha256::digest(format!("{}\0{id}", f.name)).into())
    };
    let me = key(&f.node_id, !f.open_pids.is_empty());
    let ahead = f
        .ready_elsewhere
        .iter()
        .filter(|(id, in_use)| key(id, *in_use) < me)
        .count();
    ahead < needed
}

/// The cleanup loop's verdict for a copy unused for `wait` or longer.
pub fn auto_cleanup(f: &CopyFacts, wait: Duration, node_default: u32) -> Verdict {
    if let Some(h) = holder(f) {
        return Verdict::Keep(format!("in use: {h}"));
    }
    if f.idle < wait {
        return Verdict::Keep(format!("used {} s ago", f.idle.as_secs()));
    }
    manual_cleanup(f, node_default, true)
}

/// A cleanup asked for now (`bifs cleanup`): refused for a copy in use or one the
/// cluster's minimum needs. `automatic`: also keep it when this node is a keeper.
pub fn manual_cleanup(f: &CopyFacts, node_default: u32, automatic: bool) -> Verdict {
    if let Some(h) = holder(f) {
        return Verdict::Keep(format!("in use: {h}"));
    }
    let need = needed(f.min_copies, node_default);
    if f.ready_elsewhere.len() < need {
        return Verdict::Keep(format!(
            "the cluster keeps at least {need} ready cop{} of {:?} and {} other node(s) hold one",
            if need == 1 { "y" } else { "ies" },
            f.name,
            f.ready_elsewhere.len()
        ));
    }
    if automatic && f.state == State::Ready && is_keeper(f, need) {
        return Verdict::Keep("this node is one of the copies the cluster keeps".into());
    }
    Verdict::Remove
}

/// Whether this node should fetch a copy of `name` to bring the cluster back to its
/// minimum, and after how long a deficit: the nodes without a copy ordered by a hash of
/// the name and node id; the first acts after `grace`, the next after another `grace`,
/// and so on, so one node fetches and the others see the count restored first.
pub fn replica_delay(name: &str, me: &str, others_without: &[String], grace: Duration) -> Duration {
    let rank = |id: &str| -> [u8; 32] { Sha256::digest(format!("{name}\0{id}")).into() };
    let mine = rank(me);
    let ahead = others_without.iter().filter(|id| rank(id) < mine).count() as u32;
    grace * (ahead + 1)
}

/// The order a cleanup pass goes through copies: failed, then unfinished, then ready.
pub fn cleanup_order(state: State) -> u8 {
    match state {
        State::Failed => 0,
        State::Pending | State::InProgress => 1,
        State::Ready => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: State, elsewhere: &[&str], min: u32) -> CopyFacts {
        CopyFacts {
            name: "img".into(),
            state,
            open_pids: vec![],
            idle: Duration::from_secs(3600),
            node_id: "me".into(),
            ready_elsewhere: elsewhere.iter().map(|s| (s.to_string(), false)).collect(),
            min_copies: min,
        }
    }

    #[test]
    fn the_only_copy_is_never_removed() {
        let f = facts(State::Ready, &[], 0);
        assert!(matches!(
            auto_cleanup(&f, Duration::ZERO, 1),
            Verdict::Keep(_)
        ));
        assert!(
            matches!(manual_cleanup(&f, 1, false), Verdict::Keep(m) if m.contains("at least 1"))
        );
    }

    #[test]
    fn open_handles_and_recent_use_keep_a_copy() {
        let mut f = facts(State::Ready, &["a", "b"], 1);
        f.open_pids = vec![std::process::id()];
        match manual_cleanup(&f, 1, false) {
            Verdict::Keep(m) => assert!(m.contains("open handle") && m.contains("pid"), "{m}"),
            v => panic!("{v:?}"),
        }
        f.open_pids.clear();
        f.idle = Duration::from_secs(5);
        assert!(
            matches!(auto_cleanup(&f, Duration::from_secs(60), 1), Verdict::Keep(m) if m.contains("used"))
        );
    }

    #[test]
    fn exactly_the_keepers_stay_when_all_copies_are_unused() {
        // Three ready copies, minimum 2: whatever the ids, exactly one node removes its copy.
        for names in [["n1", "n2", "n3"], ["x", "y", "z"], ["aa", "b", "c9"]] {
            let removing = names
                .iter()
                .filter(|me| {
                    let others: Vec<&str> = names.iter().copied().filter(|n| n != *me).collect();
                    let mut f = facts(State::Ready, &others, 2);
                    f.node_id = me.to_string();
                    auto_cleanup(&f, Duration::ZERO, 1) == Verdict::Remove
                })
                .count();
            assert_eq!(removing, 1, "{names:?}");
        }
    }

    #[test]
    fn a_copy_in_use_elsewhere_is_the_keeper() {
        // Whatever the hash order, the unused copy goes when the other one is in use.
        for other in ["a", "b", "c", "d", "e"] {
            let mut f = facts(State::Ready, &[other], 1);
            f.ready_elsewhere[0].1 = true;
            assert_eq!(
                auto_cleanup(&f, Duration::ZERO, 1),
                Verdict::Remove,
                "{other}"
            );
        }
    }

    #[test]
    fn failed_and_unfinished_copies_go_when_enough_ready_copies_exist_elsewhere() {
        assert_eq!(
            auto_cleanup(&facts(State::Failed, &["a"], 1), Duration::ZERO, 1),
            Verdict::Remove
        );
        assert_eq!(
            auto_cleanup(&facts(State::InProgress, &["a"], 1), Duration::ZERO, 1),
            Verdict::Remove
        );
        assert!(matches!(
            auto_cleanup(&facts(State::Failed, &[], 1), Duration::ZERO, 1),
            Verdict::Keep(_)
        ));
        assert!(cleanup_order(State::Failed) < cleanup_order(State::InProgress));
        assert!(cleanup_order(State::InProgress) < cleanup_order(State::Ready));
    }
}
