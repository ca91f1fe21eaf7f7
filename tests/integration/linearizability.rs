//! A linearizability checker (Wing & Gong's search with Lowe's memoisation, as Porcupine does
//! it) for histories of puts and gets on independent keys, and the test that records such a
//! history on a three-member cluster while its leader is killed and restarted.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{client, rt, Cluster};

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Put(String),
    Get,
}

/// One operation of a history. `ret: None` means the client never learned the outcome (a
/// timeout or an error): it may have taken effect at any time after its call, or never.
#[derive(Clone, Debug)]
pub struct Op {
    pub key: String,
    pub call: u64,
    pub ret: Option<u64>,
    pub input: Input,
    /// For a completed get, the value read (`None`: the key did not exist).
    pub read: Option<Option<String>>,
}

/// Apply `op` to a register holding `state`: whether the op's result is possible, and the
/// state after it.
fn step(state: &Option<String>, op: &Op) -> (bool, Option<String>) {
    match (&op.input, &op.read) {
        (Input::Put(v), _) => (true, Some(v.clone())),
        (Input::Get, Some(read)) => (read == state, state.clone()),
        (Input::Get, None) => (true, state.clone()),
    }
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Whether the history of one register is linearizable.
fn check_register(ops: &[Op]) -> bool {
    // Events in time order; a call and a return at the same instant count as concurrent.
    let mut order: Vec<(u64, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, true, i));
        order.push((op.ret.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|(t, is_call, _)| (*t, !*is_call));
    let mut events: Vec<Event> = order
        .iter()
        .enumerate()
        .map(|(i, (_, is_call, op))| Event {
            op: *op,
            is_call: *is_call,
            prev: i.checked_sub(1),
            next: if i + 1 < order.len() { Some(i + 1) } else { None },
        })
        .collect();
    let mut call_of = vec![0; ops.len()];
    let mut ret_of = vec![0; ops.len()];
    for (i, e) in events.iter().enumerate() {
        if e.is_call {
            call_of[e.op] = i;
        } else {
            ret_of[e.op] = i;
        }
    }
    let mut head: Option<usize> = if events.is_empty() { None } else { Some(0) };
    let unlink = |events: &mut Vec<Event>, head: &mut Option<usize>, i: usize| {
        let (p, n) = (events[i].prev, events[i].next);
        match p {
            Some(p) => events[p].next = n,
            None => *head = n,
        }
        if let Some(n) = n {
            events[n].prev = p;
        }
    };
    let relink = |events: &mut Vec<Event>, head: &mut Option<usize>, i: usize| {
        let (p, n) = (events[i].prev, events[i].next);
        match p {
            Some(p) => events[p].next = Some(i),
            None => *head = Some(i),
        }
        if let Some(n) = n {
            events[n].prev = Some(i);
        }
    };
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut state: Option<String> = None;
    let mut entry = head;
    loop {
        if head.is_none() {
            return true;
        }
        match entry.map(|e| events[e]) {
            Some(ev) if ev.is_call => {
                let (ok, next_state) = step(&state, &ops[ev.op]);
                if ok {
                    let mut bits = linearized.clone();
                    bits[ev.op / 64] |= 1 << (ev.op % 64);
                    if cache.insert((bits.clone(), next_state.clone())) {
                        stack.push((ev.op, std::mem::replace(&mut state, next_state)));
                        linearized = bits;
                        unlink(&mut events, &mut head, call_of[ev.op]);
                        unlink(&mut events, &mut head, ret_of[ev.op]);
                        entry = head;
                        continue;
                    }
                }
                entry = ev.next;
            }
            // A return whose call is still pending, or nothing left to try: an earlier choice
            // was wrong, so undo the latest one and try the next call after it.
            _ => {
                let Some((op, prev)) = stack.pop() else { return false };
                state = prev;
                linearized[op / 64] &= !(1 << (op % 64));
                relink(&mut events, &mut head, ret_of[op]);
                relink(&mut events, &mut head, call_of[op]);
                entry = events[call_of[op]].next;
            }
        }
    }
}

/// Whether a history over independent keys is linearizable: each key is checked alone.
pub fn linearizable(history: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        if !check_register(&ops) {
            return Err(format!("key {key}: no linearization of {} operations", ops.len()));
        }
    }
    Ok(())
}

fn op(key: &str, call: u64, ret: Option<u64>, input: Input, read: Option<Option<&str>>) -> Op {
    Op { key: key.into(), call, ret, input, read: read.map(|r| r.map(str::to_string)) }
}

#[test]
fn the_checker_accepts_linearizable_histories_and_rejects_others() {
    use Input::*;
    // Concurrent put and get: the get may see either value.
    let ok = vec![
        op("k", 0, Some(10), Put("a".into()), None),
        op("k", 20, Some(40), Put("b".into()), None),
        op("k", 25, Some(30), Get, Some(Some("a"))),
        op("k", 50, Some(60), Get, Some(Some("b"))),
    ];
    assert_eq!(linearizable(&ok), Ok(()));
    // A put whose outcome is unknown may have happened...
    let unknown = vec![
        op("k", 0, None, Put("x".into()), None),
        op("k", 10, Some(20), Get, Some(Some("x"))),
        op("k", 30, Some(40), Get, Some(Some("x"))),
    ];
    assert_eq!(linearizable(&unknown), Ok(()));
    // ...or not.
    let never = vec![op("k", 0, None, Put("x".into()), None), op("k", 10, Some(20), Get, Some(None))];
    assert_eq!(linearizable(&never), Ok(()));
    // A stale read: "a" was overwritten by "b" before the get began.
    let stale = vec![
        op("k", 0, Some(10), Put("a".into()), None),
        op("k", 20, Some(30), Put("b".into()), None),
        op("k", 40, Some(50), Get, Some(Some("a"))),
    ];
    assert!(linearizable(&stale).is_err());
    // Reads going back in time: after one client saw "b", a later read sees "a" again.
    let flip = vec![
        op("k", 0, Some(100), Put("a".into()), None),
        op("k", 0, Some(100), Put("b".into()), None),
        op("k", 10, Some(20), Get, Some(Some("b"))),
        op("k", 30, Some(40), Get, Some(Some("a"))),
        op("k", 50, Some(60), Get, Some(Some("b"))),
    ];
    assert!(linearizable(&flip).is_err());
}

#[test]
fn kv_history_under_leader_kills_is_linearizable() {
    let mut c = Cluster::start(3);
    let endpoints: Vec<String> = (0..3).map(|i| c.endpoint(i)).collect();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let origin = Instant::now();
    let now = move || origin.elapsed().as_nanos() as u64;
    let rt = rt();
    let clients: Vec<_> = (0..4)
        .map(|w| {
            let (endpoints, history, stop) = (endpoints.clone(), history.clone(), stop.clone());
            rt.spawn(async move {
                let mut conns = Vec::new();
                for ep in &endpoints {
                    conns.push(client(ep).await);
                }
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("lin/{}", (n * 7 + w) % 4);
                    let conn = &mut conns[(n + w) % endpoints.len()];
                    let call = now();
                    let (input, outcome) = if n.is_multiple_of(2) {
                        let v = format!("{w}-{n}");
                        let r =
                            tokio::time::timeout(Duration::from_millis(500), conn.put(key.clone(), v.clone(), None))
                                .await;
                        (Input::Put(v), r.ok().and_then(|r| r.ok()).map(|_| None))
                    } else {
                        let r = tokio::time::timeout(Duration::from_millis(500), conn.get(key.clone(), None)).await;
                        let read = r
                            .ok()
                            .and_then(|r| r.ok())
                            .map(|g| Some(g.kvs().first().map(|kv| kv.value_str().unwrap().to_string())));
                        (Input::Get, read)
                    };
                    let ret = outcome.as_ref().map(|_| now());
                    history.lock().unwrap().push(Op { key, call, ret, input, read: outcome.flatten() });
                    n += 1;
                    if ret.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        let leader = c.leader();
        c.kill(leader);
        std::thread::sleep(Duration::from_millis(2500));
        c.restart(leader);
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for t in clients {
            t.await.unwrap();
        }
    });
    let history = history.lock().unwrap().clone();
    let completed = history.iter().filter(|o| o.ret.is_some()).count();
    assert!(completed > 200, "only {completed} operations completed");
    assert_eq!(linearizable(&history), Ok(()), "{} operations", history.len());
}
