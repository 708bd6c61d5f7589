//! Scheduler unit tests driven by a fabricated shard: budgets, chunking, prefix reuse, eviction,
//! filter/clear, cancellation, failures, long generations, KV on demand and preemption.

mod preemption;

use super::*;
use std::collections::BTreeMap;
use tessera_proto::v3::{self, GeneratedText, Tokens};

/// A stand-in for the shards' batch bookkeeping: what a TGI-compatible shard answers, without a model.
#[derive(Default)]
struct FakeShard {
    batches: BTreeMap<u64, Vec<Seq>>,
    /// Prompt tokens the shard computes per forward when continuing a chunked prefill.
    chunk: u32,
    /// Requests the shard refuses: left out of their Prefill, as the real shard does.
    refuse: HashSet<u64>,
}

/// Tokens per KV block in these tests (`config`).
const BLOCK: u32 = 4;

#[derive(Clone)]
struct Seq {
    id: u64,
    to_prefill: u32,
    generated: u32,
    max_new: u32,
    /// Positions whose KV is computed, and the KV slots the router gave (blocks × BLOCK).
    fed: u32,
    capacity: u32,
}

/// The token a fake shard generates as a request's `index`-th: resumed requests must go on
/// with the next index.
fn token(id: u64, index: u32) -> u32 {
    id as u32 * 1000 + index
}

impl FakeShard {
    fn run(&mut self, step: &Step) -> Outcome {
        match step {
            Step::Prefill { batch, cached, .. } => {
                self.grant(cached.as_slice());
                let mut seqs = cached
                    .as_ref()
                    .map(|c| self.batches.remove(&c.id).unwrap())
                    .unwrap_or_default();
                let fresh: Vec<Seq> = batch
                    .requests
                    .iter()
                    .filter(|r| !self.refuse.contains(&r.id))
                    .map(|r| {
                        let generated = r.generated_ids.len() as u32;
                        let replayed = (0..generated).map(|i| token(r.id, i)).collect::<Vec<_>>();
                        assert_eq!(r.generated_ids, replayed, "resumed with what it generated");
                        Seq {
                            id: r.id,
                            to_prefill: r.inputs.len() as u32 + generated - r.cache_len,
                            generated,
                            max_new: r.stopping_parameters.as_ref().unwrap().max_new_tokens,
                            fed: r.cache_len,
                            capacity: r.blocks.len() as u32 * BLOCK,
                        }
                    })
                    .collect();
                let chunks: HashMap<u64, u32> = batch
                    .requests
                    .iter()
                    .filter_map(|r| r.chunk_len.map(|c| (r.id, c)))
                    .collect();
                seqs.extend(fresh);
                let id = cached.as_ref().map_or(batch.id, |c| c.id);
                if seqs.is_empty() {
                    return Outcome::Failed(RouterError::Generation("refused".into()));
                }
                self.forward(id, seqs, &chunks)
            }
            Step::Decode { batches } => {
                self.grant(batches);
                let seqs = batches
                    .iter()
                    .flat_map(|b| self.batches.remove(&b.id).unwrap())
                    .collect();
                self.forward(batches[0].id, seqs, &HashMap::new())
            }
            Step::Filter {
                batch_id,
                request_ids,
            } => {
                let mut seqs = self.batches.remove(batch_id).unwrap();
                seqs.retain(|s| request_ids.contains(&s.id));
                let cached = Self::cached(*batch_id, &seqs);
                self.batches.insert(*batch_id, seqs);
                Outcome::Filtered(Some(cached))
            }
            Step::Clear { batch_id } => {
                self.batches.remove(batch_id);
                Outcome::Cleared
            }
        }
    }

    /// KV blocks the router grants before a forward.
    fn grant(&mut self, batches: &[CachedBatch]) {
        for grant in batches.iter().flat_map(|b| &b.kv_grants) {
            let seq = self
                .batches
                .values_mut()
                .flatten()
                .find(|s| s.id == grant.request_id)
                .expect("a grant names a held request");
            seq.capacity += grant.blocks.len() as u32 * BLOCK;
        }
    }

    fn forward(&mut self, id: u64, mut seqs: Vec<Seq>, chunks: &HashMap<u64, u32>) -> Outcome {
        let mut generations = Vec::new();
        for seq in seqs.iter_mut().filter(|s| s.generated < s.max_new) {
            if seq.to_prefill > 0 {
                let step = chunks.get(&seq.id).copied().unwrap_or(if self.chunk > 0 {
                    self.chunk
                } else {
                    u32::MAX
                });
                let n = step.min(seq.to_prefill);
                seq.to_prefill -= n;
                seq.fed += n;
            } else {
                seq.fed += 1;
            }
            assert!(
                seq.fed <= seq.capacity,
                "request {} fed {} positions into {} KV slots",
                seq.id,
                seq.fed,
                seq.capacity
            );
            if seq.to_prefill > 0 {
                continue;
            }
            seq.generated += 1;
            let done = seq.generated == seq.max_new;
            generations.push(Generation {
                request_id: seq.id,
                tokens: Some(Tokens {
                    ids: vec![token(seq.id, seq.generated - 1)],
                    logprobs: vec![-0.5],
                    texts: vec!["x".into()],
                    is_special: vec![false],
                }),
                generated_text: done.then(|| GeneratedText {
                    text: "x".repeat(seq.generated as usize),
                    generated_tokens: seq.generated,
                    finish_reason: v3::FinishReason::Length as i32,
                    seed: None,
                }),
                ..Default::default()
            });
        }
        if seqs.iter().all(|s| s.generated == s.max_new) {
            return Outcome::Forward {
                generations,
                batch: None,
            };
        }
        let cached = Self::cached(id, &seqs);
        self.batches.insert(id, seqs);
        Outcome::Forward {
            generations,
            batch: Some(cached),
        }
    }

    fn cached(id: u64, seqs: &[Seq]) -> CachedBatch {
        let current = seqs.iter().filter(|s| s.generated < s.max_new).map(|s| {
            if s.to_prefill > 0 {
                s.to_prefill
            } else {
                1
            }
        });
        CachedBatch {
            id,
            request_ids: seqs.iter().map(|s| s.id).collect(),
            size: seqs.len() as u32,
            max_tokens: 0,
            current_tokens: current.sum(),
            kv_grants: Vec::new(),
        }
    }
}

fn config(chunking: bool) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 4,
        num_blocks: 64,
        max_batch_prefill_tokens: 16,
        max_batch_size: None,
        support_chunking: chunking,
        prefix_caching: true,
        speculate: 0,
        waiting_served_ratio: 0.0,
        max_waiting_tokens: 20,
        policy: SchedulingPolicy::Fcfs,
        kv_allocation: KvAllocation::OnDemand,
    }
}

/// The reservation tests count TGI's up-front blocks.
fn up_front(mut cfg: SchedulerConfig) -> SchedulerConfig {
    cfg.kv_allocation = KvAllocation::UpFront;
    cfg
}

/// A request whose prompt ids are `prompt`; `inputs` carries one char per token so the fake shard
/// knows the prompt length.
fn request(id: u64, prompt: &[u32], max_new: u32) -> NewRequest {
    NewRequest {
        id: RequestId(id),
        input_ids: prompt.to_vec(),
        max_new_tokens: max_new,
        prefill_logprobs: false,
        priority: 0,
        generated: Vec::new(),
        preemptions: 0,
        request: v3::Request {
            id,
            inputs: "p".repeat(prompt.len()),
            stopping_parameters: Some(v3::StoppingCriteriaParameters {
                max_new_tokens: max_new,
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// Run steps until idle; returns every step and event.
fn drive(s: &mut Scheduler, shard: &mut FakeShard) -> (Vec<Step>, Vec<Event>) {
    let (mut steps, mut events) = (Vec::new(), Vec::new());
    while let Some(step) = s.schedule(Instant::now()) {
        let outcome = shard.run(&step);
        events.extend(s.update(outcome));
        steps.push(step);
        assert!(steps.len() < 10_000, "scheduler does not converge");
    }
    (steps, events)
}

fn finished(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Generation(g) if g.generated_text.is_some() => Some(g.request_id),
            _ => None,
        })
        .collect()
}

fn prompt(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).collect()
}

#[test]
fn chunking_merges_new_prefills_and_chunks_the_last_one_to_the_budget() {
    let mut s = Scheduler::new(config(true));
    let now = Instant::now();
    for id in 0..3 {
        s.enqueue(request(id, &prompt(100 * id as u32, 6), 3), now);
    }
    let Some(Step::Prefill {
        batch,
        cached: None,
        admitted,
    }) = s.schedule(now)
    else {
        panic!("prefill")
    };
    assert_eq!(admitted.len(), 3);
    let chunks: Vec<Option<u32>> = batch.requests.iter().map(|r| r.chunk_len).collect();
    assert_eq!(
        chunks,
        vec![None, None, Some(4)],
        "6 + 6 + 4 = the 16-token budget"
    );
    let mut shard = FakeShard {
        chunk: 16,
        ..Default::default()
    };
    let outcome = shard.run(&Step::Prefill {
        batch,
        cached: None,
        admitted,
    });
    s.update(outcome);
    let (_, events) = drive(&mut s, &mut shard);
    let mut done = finished(&events);
    done.sort();
    assert_eq!(done, vec![0, 1, 2]);
    assert_eq!(s.stats().running, 0);
}

#[test]
fn new_requests_join_the_running_batch_in_one_forward() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 4), 10), Instant::now());
    let step = s.schedule(Instant::now()).unwrap();
    s.update(shard.run(&step));
    s.enqueue(request(1, &prompt(50, 4), 2), Instant::now());
    let Some(Step::Prefill {
        cached: Some(cached),
        ..
    }) = s.schedule(Instant::now())
    else {
        panic!("merged prefill")
    };
    assert_eq!(cached.request_ids, vec![0]);
}

#[test]
fn non_chunking_prefills_separately_then_decodes_both_batches() {
    let mut s = Scheduler::new(config(false));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 10), 5), Instant::now());
    s.enqueue(request(1, &prompt(50, 10), 5), Instant::now());
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!()
    };
    assert_eq!(
        batch.requests.len(),
        1,
        "the second prompt exceeds the remaining budget"
    );
    let step = Step::Prefill {
        batch,
        cached: None,
        admitted: vec![],
    };
    s.update(shard.run(&step));
    let step = s.schedule(Instant::now()).unwrap();
    assert!(matches!(step, Step::Prefill { cached: None, .. }));
    s.update(shard.run(&step));
    let Some(Step::Decode { batches }) = s.schedule(Instant::now()) else {
        panic!("decode")
    };
    assert_eq!(batches.len(), 2);
}

#[test]
fn a_shared_prefix_reuses_cached_blocks() {
    let mut s = Scheduler::new(up_front(config(true)));
    let mut shard = FakeShard::default();
    let system = prompt(0, 9);
    s.enqueue(request(0, &system, 2), Instant::now());
    drive(&mut s, &mut shard);
    let used_by_cache = s.stats().blocks_used;
    assert_eq!(used_by_cache, 2, "the two full prompt blocks stay cached");

    let mut longer = system.clone();
    longer.extend([500, 501]);
    s.enqueue(request(1, &longer, 2), Instant::now());
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!()
    };
    let r = &batch.requests[0];
    assert_eq!(r.cache_len, 8);
    assert_eq!(r.slots.len(), 12);
    assert_eq!(
        r.slots[..8],
        (0..8)
            .map(|t| r.blocks[t / 4] * 4 + t as u32 % 4)
            .collect::<Vec<_>>()[..]
    );
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_block() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 8), 1), Instant::now());
    drive(&mut s, &mut shard);
    s.enqueue(request(1, &prompt(0, 8), 1), Instant::now());
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!()
    };
    assert_eq!(batch.requests[0].cache_len, 4);
}

#[test]
fn cached_prefixes_are_evicted_lru_when_blocks_run_out() {
    let mut cfg = config(true);
    cfg.num_blocks = 5; // 4 usable
    let mut s = Scheduler::new(up_front(cfg));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 8), 1), Instant::now());
    drive(&mut s, &mut shard);
    assert_eq!(s.stats().blocks_used, 2);
    s.enqueue(request(1, &prompt(100, 12), 4), Instant::now());
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!("evicts and admits")
    };
    assert_eq!(batch.requests[0].blocks.len(), 4);
    assert_eq!(batch.requests[0].cache_len, 0);
}

#[test]
fn without_free_blocks_the_head_waits_for_a_finish() {
    let mut cfg = config(true);
    cfg.num_blocks = 4; // 3 usable
    let mut s = Scheduler::new(up_front(cfg));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 4), 5), Instant::now());
    s.enqueue(request(1, &prompt(50, 4), 5), Instant::now());
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!()
    };
    assert_eq!(batch.requests.len(), 1);
    assert_eq!(s.stats().queued, 1);
    let step = Step::Prefill {
        batch,
        cached: None,
        admitted: vec![],
    };
    s.update(shard.run(&step));
    let (_, events) = drive(&mut s, &mut shard);
    assert_eq!(finished(&events), vec![0, 1]);
}

#[test]
fn finished_requests_are_filtered_and_cancelled_batches_cleared() {
    let mut s = Scheduler::new(config(true));
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 4), 1), Instant::now());
    s.enqueue(request(1, &prompt(50, 4), 6), Instant::now());
    let step = s.schedule(Instant::now()).unwrap();
    let events = s.update(shard.run(&step));
    assert_eq!(finished(&events), vec![0]);
    let Some(Step::Filter { request_ids, .. }) = s.schedule(Instant::now()) else {
        panic!("filter")
    };
    assert_eq!(request_ids, vec![1]);
    let step = Step::Filter {
        batch_id: 0,
        request_ids,
    };
    s.update(shard.run(&step));

    assert!(s.cancel(RequestId(1)));
    assert_eq!(s.stats().running, 0);
    assert!(matches!(
        s.schedule(Instant::now()),
        Some(Step::Clear { batch_id: 0 })
    ));
    s.update(Outcome::Cleared);
    assert!(s.is_idle());
    assert_eq!(
        s.stats().blocks_used,
        2,
        "both prefilled prompts keep their full block cached; the rest is free"
    );
}

#[test]
fn cancelling_a_queued_request_removes_it() {
    let mut s = Scheduler::new(config(true));
    s.enqueue(request(0, &prompt(0, 4), 1), Instant::now());
    assert!(s.cancel(RequestId(0)));
    assert!(s.schedule(Instant::now()).is_none());
    assert!(!s.cancel(RequestId(0)));
}

#[test]
fn a_failed_forward_fails_only_its_requests_and_clears_the_batch() {
    let mut s = Scheduler::new(config(false));
    s.enqueue(request(0, &prompt(0, 4), 3), Instant::now());
    let step = s.schedule(Instant::now()).unwrap();
    let boom = RouterError::Generation("boom".into());
    let events = s.update(Outcome::Failed(boom.clone()));
    assert_eq!(
        events,
        vec![Event::Failed {
            id: RequestId(0),
            error: boom
        }]
    );
    let Some(Step::Clear { batch_id }) = s.schedule(Instant::now()) else {
        panic!("clear")
    };
    let Step::Prefill { batch, .. } = step else {
        panic!()
    };
    assert_eq!(batch_id, batch.id);
    s.update(Outcome::Cleared);
    assert_eq!(s.stats().blocks_used, 0);

    // The router keeps serving.
    let mut shard = FakeShard::default();
    s.enqueue(request(1, &prompt(9, 4), 2), Instant::now());
    let (_, events) = drive(&mut s, &mut shard);
    assert_eq!(finished(&events), vec![1]);
}

#[test]
fn long_generations_are_scheduled_whole() {
    let mut cfg = config(true);
    cfg.num_blocks = 1024;
    let mut s = Scheduler::new(cfg);
    let mut shard = FakeShard::default();
    s.enqueue(request(0, &prompt(0, 4), 1500), Instant::now());
    let (steps, events) = drive(&mut s, &mut shard);
    let prefills = steps
        .iter()
        .filter(|s| matches!(s, Step::Prefill { .. }))
        .count();
    assert_eq!(prefills, 1, "no re-queue at 1024 tokens");
    let Some(Event::Generation(last)) = events.last() else {
        panic!()
    };
    assert_eq!(last.generated_text.as_ref().unwrap().generated_tokens, 1500);
}

#[test]
fn max_batch_size_caps_admission() {
    let mut cfg = config(true);
    cfg.max_batch_size = Some(2);
    let mut s = Scheduler::new(cfg);
    for id in 0..4 {
        s.enqueue(request(id, &prompt(10 * id as u32, 2), 2), Instant::now());
    }
    let Some(Step::Prefill { batch, .. }) = s.schedule(Instant::now()) else {
        panic!()
    };
    assert_eq!(batch.requests.len(), 2);
}

#[test]
fn a_request_the_shard_refuses_fails_alone_and_frees_its_blocks() {
    let mut cfg = config(true);
    cfg.prefix_caching = false;
    let mut s = Scheduler::new(cfg);
    let mut shard = FakeShard {
        refuse: HashSet::from([1, 3]),
        ..Default::default()
    };
    // 1 is refused in the long request's own Prefill, 3 while joining it with 2.
    s.enqueue(request(0, &prompt(0, 4), 12), Instant::now());
    s.enqueue(request(1, &prompt(20, 4), 3), Instant::now());
    let step = s.schedule(Instant::now()).unwrap();
    let mut events = s.update(shard.run(&step));
    s.enqueue(request(2, &prompt(40, 4), 3), Instant::now());
    s.enqueue(request(3, &prompt(60, 4), 3), Instant::now());
    events.extend(drive(&mut s, &mut shard).1);

    let failed: Vec<(u64, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Failed { id, error } => Some((id.0, error.to_string())),
            _ => None,
        })
        .collect();
    let dropped = "Request failed during generation: the shard dropped the request".to_string();
    assert_eq!(failed, vec![(1, dropped.clone()), (3, dropped)]);
    let mut done = finished(&events);
    done.sort();
    assert_eq!(done, vec![0, 2]);
    let tokens_of_0 = events
        .iter()
        .filter(|e| matches!(e, Event::Generation(g) if g.request_id == 0))
        .count();
    assert_eq!(tokens_of_0, 12, "the long request runs to its end");
    assert_eq!(
        s.stats().blocks_used,
        0,
        "refused requests' blocks are back"
    );
}

/// Request ids in the order prefill steps admitted them.
fn admission_order(steps: &[Step]) -> Vec<u64> {
    steps
        .iter()
        .flat_map(|step| match step {
            Step::Prefill { admitted, .. } => admitted.iter().map(|(id, _)| id.0).collect(),
            _ => Vec::new(),
        })
        .collect()
}

fn prioritized(id: u64, priority: i32) -> NewRequest {
    NewRequest {
        priority,
        ..request(id, &prompt(100 * id as u32, 3), 2)
    }
}

#[test]
fn the_priority_policy_admits_lower_values_first_and_fcfs_ignores_them() {
    for (policy, want) in [
        (SchedulingPolicy::Priority, vec![0, 3, 5, 4, 1, 2]),
        (SchedulingPolicy::Fcfs, vec![0, 1, 2, 3, 4, 5]),
    ] {
        let mut cfg = config(true);
        cfg.max_batch_size = Some(1);
        cfg.policy = policy;
        let mut s = Scheduler::new(cfg);
        let now = Instant::now();
        // 0 runs first; the rest arrive while it does.
        s.enqueue(prioritized(0, 10), now);
        let mut shard = FakeShard::default();
        let first = s.schedule(now).unwrap();
        s.update(shard.run(&first));
        for (id, priority) in [(1, 10), (2, 10), (3, -1), (4, 5), (5, -1)] {
            s.enqueue(prioritized(id, priority), now);
        }
        let (steps, _) = drive(&mut s, &mut shard);
        let mut order = admission_order(std::slice::from_ref(&first));
        order.extend(admission_order(&steps));
        assert_eq!(order, want, "{policy:?}");
    }
}

#[test]
fn small_requests_pass_a_head_that_does_not_fit_a_bounded_number_of_times() {
    let mut cfg = config(true);
    cfg.num_blocks = 16; // 15 usable: 60 tokens
    let mut s = Scheduler::new(up_front(cfg));
    let mut shard = FakeShard::default();
    let now = Instant::now();
    // 0 holds 12 blocks for its 40 new tokens; 1 needs 10 and must wait for it.
    s.enqueue(request(0, &prompt(0, 8), 40), now);
    let first = s.schedule(now).unwrap();
    s.update(shard.run(&first));
    s.enqueue(request(1, &prompt(1000, 8), 32), now);
    let small: Vec<u64> = (2..42).collect();
    for &id in &small {
        s.enqueue(request(id, &prompt(100 * id as u32, 2), 2), now);
    }
    let (steps, events) = drive(&mut s, &mut shard);
    let order = admission_order(&steps);
    let head_at = order.iter().position(|&id| id == 1).unwrap();
    assert_eq!(
        head_at, MAX_BYPASS as usize,
        "small requests went first exactly MAX_BYPASS times: {order:?}"
    );
    assert!(order[..head_at].iter().all(|id| small.contains(id)));
    let mut done = finished(&events);
    done.sort();
    assert_eq!(done, (0..42).collect::<Vec<_>>(), "nothing starves");
}

#[test]
fn under_saturation_priority_zero_waits_flat_while_priority_ten_queues() {
    let mut cfg = config(true);
    cfg.max_batch_size = Some(4);
    cfg.policy = SchedulingPolicy::Priority;
    let mut s = Scheduler::new(cfg);
    let mut shard = FakeShard::default();
    let start = Instant::now();
    let mut now = start;
    let mut next_id = 0;
    let mut waits: HashMap<i32, Vec<Duration>> = HashMap::new();
    let mut priority_of = HashMap::new();
    // Each 10 ms step: two priority-10 requests arrive (more than the batch can serve), and one
    // priority-0 request every fifth step.
    for step in 0..400 {
        let arrivals: &[i32] = if step % 5 == 0 {
            &[10, 10, 0]
        } else {
            &[10, 10]
        };
        for &priority in arrivals {
            s.enqueue(prioritized(next_id, priority), now);
            priority_of.insert(next_id, priority);
            next_id += 1;
        }
        if let Some(step) = s.schedule(now) {
            if let Step::Prefill { admitted, .. } = &step {
                for (id, waited) in admitted {
                    waits.entry(priority_of[&id.0]).or_default().push(*waited);
                }
            }
            s.update(shard.run(&step));
        }
        now += Duration::from_millis(10);
    }
    let worst = |p: i32| waits[&p].iter().max().copied().unwrap();
    let late_mean = |p: i32| {
        let w = &waits[&p];
        let late = &w[w.len() / 2..];
        late.iter().sum::<Duration>() / late.len() as u32
    };
    println!(
        "priority 0: worst wait {:?}; priority 10: mean wait of the later half {:?}",
        worst(0),
        late_mean(10)
    );
    assert!(
        worst(0) <= Duration::from_millis(100),
        "priority 0 waited {:?}",
        worst(0)
    );
    assert!(
        late_mean(10) > Duration::from_millis(500),
        "priority 10 should queue behind the saturation: {:?}",
        late_mean(10)
    );
}
