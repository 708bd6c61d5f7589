//! KV on demand on the fake shard: growth and grants, preemption and resumption, the victim rule,
//! lost shards, and a restart that resizes the cache.

use super::*;

/// Every token each request received, in order.
fn tokens_by_request(events: &[Event]) -> BTreeMap<u64, Vec<u32>> {
    let mut by = BTreeMap::<u64, Vec<u32>>::new();
    for e in events {
        if let Event::Generation(g) = e {
            let ids = g.tokens.as_ref().map(|t| t.ids.clone()).unwrap_or_default();
            by.entry(g.request_id).or_default().extend(ids);
        }
    }
    by
}

#[test]
fn on_demand_a_request_holds_blocks_for_its_context_and_is_granted_more_as_it_grows() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 6), 20), Instant::now());
    let first = s.schedule(Instant::now()).unwrap();
    let Step::Prefill { batch, .. } = &first else {
        panic!("prefill")
    };
    assert_eq!(
        batch.requests[0].blocks.len(),
        2,
        "6 prompt tokens: 2 blocks, not 7"
    );
    let mut events = s.update(shard.run(&first));
    let (steps, rest) = drive(&mut s, &mut shard);
    events.extend(rest);
    let granted: usize = steps
        .iter()
        .filter_map(|step| match step {
            Step::Decode { batches } => Some(batches),
            _ => None,
        })
        .flatten()
        .flat_map(|b| &b.kv_grants)
        .map(|g| g.blocks.len())
        .sum();
    // 6 + 20 - 1 = 25 positions: 7 blocks in all, 5 of them granted along the way.
    assert_eq!(granted, 5);
    assert_eq!(
        tokens_by_request(&events)[&0],
        (0..20).map(|i| token(0, i)).collect::<Vec<_>>()
    );
    assert_eq!(s.stats().preemptions, 0);
    assert_eq!(s.stats().running, 0);
}

/// Runs `requests` (prompt length 4, `max_new` each) on a cache of `usable` blocks.
fn run_all(
    cfg: SchedulerConfig,
    usable: u32,
    ids: &[u64],
    max_new: u32,
) -> (Scheduler, Vec<Step>, Vec<Event>) {
    let mut cfg = cfg;
    cfg.num_blocks = usable + 1;
    let mut s = Scheduler::new(cfg);
    let mut shard = FakeShard::default();
    for &id in ids {
        s.enqueue(
            request(id, &prompt(100 * id as u32, 4), max_new),
            Instant::now(),
        );
    }
    let (steps, events) = drive(&mut s, &mut shard);
    (s, steps, events)
}

#[test]
fn when_blocks_run_out_the_latest_request_is_preempted_and_resumes_where_it_stopped() {
    // 4 requests of 4 + 16 tokens (5 blocks each) on 12 blocks: up front, two at a time.
    let ids = [0, 1, 2, 3];
    let (s, steps, events) = run_all(config(true), 12, &ids, 16);
    assert!(
        s.stats().preemptions > 0,
        "the cache is too small for all four"
    );
    let resumed: Vec<&v3::Request> = steps
        .iter()
        .filter_map(|step| match step {
            Step::Prefill { batch, .. } => Some(&batch.requests),
            _ => None,
        })
        .flatten()
        .filter(|r| !r.generated_ids.is_empty())
        .collect();
    assert!(!resumed.is_empty());
    // The fake shard checked each resume carried exactly the tokens generated so far; each
    // request's stream is whole and in order.
    let tokens = tokens_by_request(&events);
    for id in ids {
        assert_eq!(
            tokens[&id],
            (0..16).map(|i| token(id, i)).collect::<Vec<_>>(),
            "request {id}"
        );
    }
    let mut done = finished(&events);
    done.sort();
    assert_eq!(done, ids);
    assert_eq!((s.stats().running, s.stats().queued), (0, 0));

    let (up_front_s, up_front_steps, _) = run_all(up_front(config(true)), 12, &ids, 16);
    assert_eq!(up_front_s.stats().preemptions, 0);
    println!(
        "forwards: on demand {} ({} preemptions), up front {}",
        steps.len(),
        s.stats().preemptions,
        up_front_steps.len()
    );
}

#[test]
fn the_victim_is_the_least_important_running_request() {
    let mut cfg = config(true);
    cfg.policy = SchedulingPolicy::Priority;
    cfg.num_blocks = 7; // 6 usable
    let mut s = Scheduler::new(cfg);
    let mut shard = FakeShard::default();
    // Request 0 arrives first with the least important priority; 1 and 2 are more important.
    let mut first = request(0, &prompt(0, 4), 12);
    first.priority = 5;
    s.enqueue(first, Instant::now());
    for id in [1, 2] {
        s.enqueue(request(id, &prompt(100 * id as u32, 4), 12), Instant::now());
    }
    let mut preempted_first = None;
    while let Some(step) = s.schedule(Instant::now()) {
        if let (Step::Filter { request_ids, .. }, None) = (&step, preempted_first) {
            preempted_first = [0u64, 1, 2]
                .into_iter()
                .find(|id| !request_ids.contains(id));
        }
        let outcome = shard.run(&step);
        s.update(outcome);
    }
    assert_eq!(
        preempted_first,
        Some(0),
        "priority 5 goes before 0s that arrived later"
    );
    assert!(s.stats().preemptions > 0);
}

#[test]
fn requests_of_lost_shards_resume_on_new_ones_where_they_stopped() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    for id in 0..3 {
        s.enqueue(request(id, &prompt(100 * id as u32, 6), 12), Instant::now());
    }
    let mut events = Vec::new();
    for _ in 0..5 {
        let step = s.schedule(Instant::now()).unwrap();
        events.extend(s.update(shard.run(&step)));
    }
    // The shard process dies during the next step: its answer never comes.
    let _lost = s.schedule(Instant::now()).unwrap();
    assert!(s.update(Outcome::ShardsLost).is_empty(), "nobody fails");
    assert_eq!((s.stats().running, s.stats().queued), (0, 3));
    assert_eq!(
        s.allocator.cached_blocks(),
        0,
        "the dead shard's KV is gone"
    );
    let mut restarted = FakeShard::default();
    let (steps, rest) = drive(&mut s, &mut restarted);
    events.extend(rest);
    assert!(matches!(&steps[0], Step::Prefill { cached: None, .. }));
    let tokens = tokens_by_request(&events);
    for id in 0..3 {
        assert_eq!(
            tokens[&id],
            (0..12).map(|i| token(id, i)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn fail_all_ends_every_waiting_and_running_request() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    for id in 0..2 {
        s.enqueue(request(id, &prompt(100 * id as u32, 4), 8), Instant::now());
    }
    let step = s.schedule(Instant::now()).unwrap();
    s.update(shard.run(&step));
    s.enqueue(request(2, &prompt(300, 4), 8), Instant::now());
    let failed: Vec<u64> = s
        .fail_all(&RouterError::Generation("gone".into()))
        .iter()
        .map(|e| match e {
            Event::Failed { id, .. } => id.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(failed, vec![0, 1, 2]);
    assert!(s.is_idle());
}

#[test]
fn restarted_shards_with_a_smaller_cache_resize_it_and_refuse_what_no_longer_fits() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 4), 8), Instant::now());
    s.enqueue(request(1, &prompt(100, 4), 60), Instant::now());
    let step = s.schedule(Instant::now()).unwrap();
    s.update(shard.run(&step));
    let _lost = s.schedule(Instant::now()).unwrap();
    s.update(Outcome::ShardsLost);
    // 16 blocks, 15 usable: 60 tokens, less than request 1's 4 + 60 - 1.
    let failed = s.resize(16);
    assert!(
        matches!(
            &failed[..],
            [Event::Failed {
                id: RequestId(1),
                ..
            }]
        ),
        "{failed:?}"
    );
    let (_, events) = drive(&mut s, &mut FakeShard::default());
    assert_eq!(finished(&events), vec![0]);
    let stats = s.stats();
    assert_eq!(stats.blocks_free + stats.blocks_used, 15, "the new size");
}
