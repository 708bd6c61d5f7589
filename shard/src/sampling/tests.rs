//! Unit tests of the next-token chooser on hand-made logits.

use super::*;

fn params(f: impl FnOnce(&mut NextTokenChooserParameters)) -> Result<SamplingParams, Error> {
    let mut p = NextTokenChooserParameters {
        temperature: 1.0,
        repetition_penalty: 1.0,
        top_p: 1.0,
        typical_p: 1.0,
        ..Default::default()
    };
    f(&mut p);
    SamplingParams::from_proto(Some(&p))
}

fn sampler(p: SamplingParams) -> Sampler {
    Sampler::new(p, &[], 0, None)
}

#[test]
fn greedy_takes_argmax_and_reports_raw_logprob() {
    let mut s = Sampler::new(SamplingParams::default(), &[], 2, None);
    let logits = [1.0, 3.0, 2.0, -1.0];
    let c = s.choose(&logits).unwrap();
    assert_eq!(c.id, 1);
    let lse = logits.iter().map(|v: &f32| v.exp()).sum::<f32>().ln();
    assert!((c.logprob - (3.0 - lse)).abs() < 1e-6);
    assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.seed(), None);
}

#[test]
fn argmax_ignores_nan_and_prefers_lowest_id_on_ties() {
    assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
    assert_eq!(argmax(&[0.5, f32::NAN]), 0);
}

#[test]
fn log_softmax_is_normalised() {
    let l = log_softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
    assert!((l[0] - (0.5f32).ln()).abs() < 1e-6);
    assert_eq!(l[2], f32::NEG_INFINITY);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    // Token 0 (positive, seen) would win without the penalty; token 2 (negative, seen) sinks further.
    let p = params(|p| p.repetition_penalty = 4.0).unwrap();
    let mut s = Sampler::new(p, &[0, 2], 0, None);
    let c = s.choose(&[4.0, 2.0, -1.0]).unwrap();
    assert_eq!(c.id, 1, "4/4 = 1 < 2");
    let mut scores = vec![4.0, 2.0, -1.0];
    s.apply_processors(&mut scores);
    assert_eq!(
        scores,
        vec![1.0, 2.0 / 4.0, -4.0],
        "token 1 now generated, so penalised too"
    );
}

#[test]
fn frequency_penalty_subtracts_per_generated_occurrence() {
    let p = params(|p| p.frequency_penalty = 1.5).unwrap();
    let mut s = Sampler::new(p, &[1], 0, None);
    // The prompt token 1 is not penalised: the OpenAI penalty counts generated tokens only.
    assert_eq!(s.choose(&[2.0, 2.5, 0.0]).unwrap().id, 1);
    // Token 1 now counts once: 2.5 - 1.5 = 1.0 < 2.0.
    assert_eq!(s.choose(&[2.0, 2.5, 0.0]).unwrap().id, 0);
    let mut scores = vec![0.0, 0.0, 0.0];
    s.apply_processors(&mut scores);
    assert_eq!(scores, vec![-1.5, -1.5, 0.0]);
}

#[test]
fn presence_penalty_subtracts_once_per_generated_token() {
    let p = params(|p| p.presence_penalty = 0.5).unwrap();
    let mut s = sampler(p);
    s.choose(&[1.0, 0.0]).unwrap();
    s.choose(&[1.0, 0.0]).unwrap();
    let mut scores = vec![0.0, 0.0];
    s.apply_processors(&mut scores);
    assert_eq!(scores, vec![-0.5, 0.0]);
}

#[test]
fn top_k_one_is_greedy_even_when_sampling() {
    let p = params(|p| {
        p.do_sample = true;
        p.top_k = 1;
        p.seed = 7;
    })
    .unwrap();
    let mut s = sampler(p);
    for _ in 0..20 {
        assert_eq!(s.choose(&[0.0, 0.1, 0.05]).unwrap().id, 1);
    }
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // probs ≈ [0.6439, 0.2369, 0.0871, 0.0321]
    let mut scores = vec![3.0, 2.0, 1.0, 0.0];
    top_p(&mut scores, 0.8);
    assert!(scores[..2].iter().all(|s| s.is_finite()));
    assert!(scores[2..].iter().all(|s| *s == f32::NEG_INFINITY));
    let mut one = vec![3.0, 2.0, 1.0];
    top_p(&mut one, 0.01);
    assert_eq!(one.iter().filter(|s| s.is_finite()).count(), 1);
}

#[test]
fn typical_p_keeps_tokens_near_the_entropy() {
    // Two likely tokens (≈0.49 each) and an unlikely tail: mass 0.4 keeps one likely token.
    let mut scores = vec![5.0, 5.0, 0.0, 0.0, 0.0, 0.0];
    typical_p(&mut scores, 0.4);
    let kept: Vec<usize> = (0..6).filter(|&i| scores[i].is_finite()).collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0] < 2);
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let run = |seed| {
        let p = params(|p| {
            p.do_sample = true;
            p.seed = seed;
        })
        .unwrap();
        let mut s = sampler(p);
        (0..40)
            .map(|_| s.choose(&logits).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn sampling_follows_the_distribution() {
    let p = params(|p| {
        p.do_sample = true;
        p.seed = 1;
    })
    .unwrap();
    let mut s = sampler(p);
    let logits = [0.0, (3.0f32).ln()]; // p = [0.25, 0.75]
    let ones = (0..4000)
        .filter(|_| s.choose(&logits).unwrap().id == 1)
        .count();
    assert!((2800..3200).contains(&ones), "{ones}");
}

#[test]
fn low_temperature_sharpens() {
    let p = params(|p| {
        p.temperature = 0.05;
        p.seed = 3;
    })
    .unwrap();
    assert!(p.is_sampling());
    let mut s = sampler(p);
    let hits = (0..200)
        .filter(|_| s.choose(&[1.0, 1.5]).unwrap().id == 1)
        .count();
    assert!(hits >= 199, "{hits}");
    assert_eq!(s.seed(), Some(3));
}

#[test]
fn watermark_shifts_mass_to_a_green_list() {
    let p = params(|p| p.watermark = true).unwrap();
    let s = Sampler::new(p, &[5], 0, None);
    let mut scores = vec![0.0; 100];
    s.apply_processors(&mut scores);
    let green = scores.iter().filter(|&&v| v == WATERMARK_DELTA).count();
    assert_eq!(green, 50);
    let mut again = vec![0.0; 100];
    s.apply_processors(&mut again);
    assert_eq!(
        scores, again,
        "the green list depends only on the previous token"
    );
}

#[test]
fn zero_means_unset_and_bad_values_name_the_field() {
    let p = SamplingParams::from_proto(Some(&NextTokenChooserParameters::default())).unwrap();
    assert_eq!(p, SamplingParams::default());
    type Set = fn(&mut NextTokenChooserParameters);
    let cases: [(&str, Set); 9] = [
        ("temperature", |p| p.temperature = -1.0),
        ("top_p", |p| p.top_p = 1.5),
        ("typical_p", |p| p.typical_p = f32::NAN),
        ("repetition_penalty", |p| p.repetition_penalty = -0.5),
        ("frequency_penalty", |p| p.frequency_penalty = 2.5),
        ("presence_penalty", |p| p.presence_penalty = -3.0),
        ("grammar_type", |p| {
            p.grammar = "[a-z]+".into();
            p.grammar_type = 7;
        }),
        ("min_p", |p| p.min_p = f32::NAN),
        ("logit_bias", |p| {
            p.logit_bias.insert(3, 101.0);
        }),
    ];
    for (field, f) in cases {
        match params(f) {
            Err(Error::InvalidArgument { field: got, .. }) => {
                assert_eq!(got, format!("parameters.{field}"))
            }
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn top_n_is_sorted_and_bounded() {
    let lp = log_softmax(&[0.0, 2.0, 1.0]);
    let t = top_n(&lp, 5);
    assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0]);
    assert!(top_n(&lp, 0).is_empty());
}

#[test]
fn empty_logits_is_an_error_not_a_panic() {
    assert!(sampler(SamplingParams::default()).choose(&[]).is_err());
}

#[test]
fn logit_bias_moves_the_greedy_choice_but_not_the_reported_logprob() {
    let p = params(|p| {
        p.logit_bias.insert(2, 5.0);
        p.logit_bias.insert(0, -100.0);
    })
    .unwrap();
    assert_eq!(p.logit_bias, vec![(0, -100.0), (2, 5.0)]);
    let logits = [3.0, 1.0, 0.0];
    let c = sampler(p).choose(&logits).unwrap();
    assert_eq!(c.id, 2);
    assert_eq!(c.logprob, log_softmax(&logits)[2]);
}

#[test]
fn min_p_keeps_tokens_near_the_most_likely() {
    // Probabilities ∝ e^s: token 1 is e^-1 ≈ 0.37 of token 0, token 2 is e^-5 ≈ 0.007 of it.
    let mut scores = vec![5.0, 4.0, 0.0];
    min_p(&mut scores, 0.1);
    assert_eq!(scores, vec![5.0, 4.0, f32::NEG_INFINITY]);
    let p = params(|p| {
        p.min_p = 0.5;
        p.seed = 7;
    })
    .unwrap();
    assert!(
        p.is_sampling(),
        "min_p is a warper: it samples, as the others do"
    );
    let mut s = sampler(p);
    for _ in 0..50 {
        assert_eq!(
            s.choose(&[5.0, 4.0, 0.0]).unwrap().id,
            0,
            "only token 0 is within half of itself"
        );
    }
}

#[test]
fn a_replayed_sampler_continues_as_the_one_that_chose() {
    let p = params(|p| {
        p.do_sample = true;
        p.temperature = 0.9;
        p.top_k = 5;
        p.seed = 77;
        p.repetition_penalty = 1.3;
        p.frequency_penalty = 0.2;
    })
    .unwrap();
    let rows: Vec<Vec<f32>> = (0..12)
        .map(|step| {
            (0..16)
                .map(|t| ((t * 7 + step * 3) % 11) as f32 * 0.3)
                .collect()
        })
        .collect();
    let mut chooser = Sampler::new(p.clone(), &[1, 2], 0, None);
    let chosen: Vec<u32> = rows.iter().map(|r| chooser.choose(r).unwrap().id).collect();
    let mut resumed = Sampler::new(p, &[1, 2], 0, None);
    for &id in &chosen[..5] {
        resumed.replay(id);
    }
    let rest: Vec<u32> = rows[5..]
        .iter()
        .map(|r| resumed.choose(r).unwrap().id)
        .collect();
    assert_eq!(rest, chosen[5..]);
}
