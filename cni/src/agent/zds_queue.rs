//! The ZDS messages the agent still owes ztunnel: one desired state per pod UID, pushed
//! under the pods lock (so a pod's Del can never overtake its Add) and sent by one task.
//!
//! A later Del replaces a queued Add (the Add was never sent; the Del covers any sent
//! before); an Add after a queued Del keeps the Del first. The queue holds no namespace
//! handle: the sender duplicates the pod's netns from its record when it sends, so a
//! queue that does not drain holds no file descriptors. Its length is at most one entry
//! per UID, and at most `cap` in all.

use std::collections::{HashMap, VecDeque};

/// A queued Add: the pod (key of the agent's records) as enrolled in `generation`, and
/// who waits for its ack.
pub struct Add<W> {
    pub pod: String,
    pub generation: u64,
    pub waiters: Vec<W>,
}

enum Desired<W> {
    Add(Add<W>),
    Del,
    DelThenAdd(Add<W>),
}

/// What to send next for a UID.
pub enum Next<W> {
    Add(Add<W>),
    Del,
}

/// The queue is at its cap: the agent cannot keep its promises to ztunnel.
#[derive(Debug, PartialEq, Eq)]
pub struct Full(pub usize);

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pods are waiting for ztunnel to take or drop them; ztunnel is not keeping up",
            self.0
        )
    }
}

pub struct Queue<W> {
    order: VecDeque<String>,
    desired: HashMap<String, Desired<W>>,
    cap: usize,
}

impl<W> Queue<W> {
    pub fn new(cap: usize) -> Self {
        Queue {
            order: VecDeque::new(),
            desired: HashMap::new(),
            cap,
        }
    }

    /// Pods with a message queued.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn slot(&mut self, uid: &str) -> Result<Option<Desired<W>>, Full> {
        match self.desired.remove(uid) {
            Some(d) => Ok(Some(d)),
            None if self.order.len() >= self.cap => Err(Full(self.order.len())),
            None => {
                self.order.push_back(uid.to_string());
                Ok(None)
            }
        }
    }

    /// Hand pod `uid` to ztunnel as enrolled in `generation`; `waiter` is answered with
    /// its ack (dropped unanswered when a later Del or Add replaces it).
    pub fn add(&mut self, uid: &str, add: Add<W>) -> Result<(), Full> {
        let next = match self.slot(uid)? {
            None | Some(Desired::Add(_)) => Desired::Add(add),
            Some(Desired::Del | Desired::DelThenAdd(_)) => Desired::DelThenAdd(add),
        };
        self.desired.insert(uid.to_string(), next);
        Ok(())
    }

    /// Tell ztunnel pod `uid` left.
    pub fn del(&mut self, uid: &str) -> Result<(), Full> {
        self.slot(uid)?;
        self.desired.insert(uid.to_string(), Desired::Del);
        Ok(())
    }

    /// The oldest pod's next message.
    pub fn pop(&mut self) -> Option<(String, Next<W>)> {
        let uid = self.order.pop_front()?;
        match self.desired.remove(&uid).expect("queued UIDs have a state") {
            Desired::Add(a) => Some((uid, Next::Add(a))),
            Desired::Del => Some((uid, Next::Del)),
            Desired::DelThenAdd(a) => {
                // Its Add goes right after the Del.
                self.order.push_front(uid.clone());
                self.desired.insert(uid.clone(), Desired::Add(a));
                Some((uid, Next::Del))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(generation: u64, waiter: u32) -> Add<u32> {
        Add {
            pod: "ns/p".into(),
            generation,
            waiters: vec![waiter],
        }
    }

    fn drain(q: &mut Queue<u32>) -> Vec<String> {
        std::iter::from_fn(|| q.pop())
            .map(|(uid, n)| match n {
                Next::Add(a) => format!("add {uid} g{} w{:?}", a.generation, a.waiters),
                Next::Del => format!("del {uid}"),
            })
            .collect()
    }

    #[test]
    fn a_del_replaces_a_queued_add_and_never_precedes_a_later_one() {
        let mut q = Queue::new(8);
        q.add("u1", add(1, 1)).unwrap();
        q.del("u1").unwrap();
        assert_eq!(drain(&mut q), ["del u1"]);

        q.del("u1").unwrap();
        q.add("u1", add(2, 2)).unwrap();
        assert_eq!(drain(&mut q), ["del u1", "add u1 g2 w[2]"]);

        // Del, Add, Del: only the Del is owed.
        q.del("u1").unwrap();
        q.add("u1", add(3, 3)).unwrap();
        q.del("u1").unwrap();
        assert_eq!(drain(&mut q), ["del u1"]);
    }

    #[test]
    fn a_later_add_replaces_a_queued_one_and_pods_keep_their_order() {
        let mut q = Queue::new(8);
        q.add("u1", add(1, 1)).unwrap();
        q.del("u2").unwrap();
        q.add("u1", add(2, 2)).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), ["add u1 g2 w[2]", "del u2"]);
        assert!(q.is_empty());
    }

    #[test]
    fn cycles_of_one_pod_take_one_slot_and_new_pods_stop_at_the_cap() {
        let mut q = Queue::new(2);
        for g in 0..1000 {
            q.add("u1", add(g, 0)).unwrap();
            q.del("u1").unwrap();
        }
        assert_eq!(q.len(), 1);
        q.add("u2", add(1, 0)).unwrap();
        assert_eq!(q.del("u3"), Err(Full(2)));
        // Pods already queued still change state at the cap.
        q.del("u2").unwrap();
        assert_eq!(drain(&mut q), ["del u1", "del u2"]);
    }
}
