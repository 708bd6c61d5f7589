//! Per-request stop criteria: EOS ids, stop sequences matched on the streamed text across token
//! boundaries (a sequence may start inside one token and end inside a later one), and max_new_tokens.
//! TGI's `StoppingCriteria` only sees a stop sequence at the end of the decoded text; here a match
//! anywhere in the newly streamed text counts.

use tessera_proto::v3::{FinishReason, StoppingCriteriaParameters};

use crate::Error;

/// Validated stopping parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StopParams {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos_token: bool,
}

impl StopParams {
    /// Mirrors rules of `router/src/validation.rs` (the single source of request validity), which
    /// refuses these first.
    pub fn from_proto(p: Option<&StoppingCriteriaParameters>) -> Result<Self, Error> {
        let invalid = |field: &str, reason: &str| Error::InvalidArgument {
            field: format!("stopping_parameters.{field}"),
            reason: reason.into(),
        };
        let p = p.ok_or_else(|| invalid("max_new_tokens", "stopping parameters are required"))?;
        if p.max_new_tokens == 0 {
            return Err(invalid("max_new_tokens", "must be at least 1"));
        }
        if p.stop_sequences.iter().any(String::is_empty) {
            return Err(invalid("stop_sequences", "a stop sequence cannot be empty"));
        }
        Ok(StopParams {
            max_new_tokens: p.max_new_tokens,
            stop_sequences: p.stop_sequences.clone(),
            ignore_eos_token: p.ignore_eos_token,
        })
    }
}

/// Decides, token by token, whether a request is finished.
#[derive(Debug, Clone)]
pub struct StoppingCriteria {
    params: StopParams,
    eos_token_ids: Vec<u32>,
    /// The tail of the streamed text that a stop sequence could still complete: at most the
    /// longest stop sequence's length minus one byte, plus the text of the current token.
    window: String,
    max_stop_len: usize,
    generated: u32,
}

impl StoppingCriteria {
    pub fn new(params: StopParams, eos_token_ids: &[u32]) -> Self {
        let max_stop_len = params
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        StoppingCriteria {
            params,
            eos_token_ids: eos_token_ids.to_vec(),
            window: String::new(),
            max_stop_len,
            generated: 0,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Records one generated token and the text it streamed (possibly empty while a character is
    /// incomplete). EOS wins over a stop sequence, which wins over the length limit.
    pub fn check(&mut self, id: u32, text: &str) -> Option<FinishReason> {
        self.generated += 1;
        if !self.params.ignore_eos_token && self.eos_token_ids.contains(&id) {
            return Some(FinishReason::EosToken);
        }
        if self.max_stop_len > 0 && !text.is_empty() {
            self.window.push_str(text);
            if self
                .params
                .stop_sequences
                .iter()
                .any(|s| self.window.contains(s.as_str()))
            {
                return Some(FinishReason::StopSequence);
            }
            self.trim_window();
        }
        (self.generated >= self.params.max_new_tokens).then_some(FinishReason::Length)
    }

    /// Keeps the last `max_stop_len - 1` bytes (cut at a char boundary): any longer tail holds
    /// no match, since every complete match has already been seen.
    fn trim_window(&mut self) {
        let keep = self.max_stop_len - 1;
        if self.window.len() > keep {
            let mut cut = self.window.len() - keep;
            while !self.window.is_char_boundary(cut) {
                cut += 1;
            }
            self.window.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn criteria(max: u32, stops: &[&str], ignore_eos: bool) -> StoppingCriteria {
        let params = StopParams {
            max_new_tokens: max,
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
            ignore_eos_token: ignore_eos,
        };
        StoppingCriteria::new(params, &[2, 7])
    }

    #[test]
    fn length_stops_at_max_new_tokens() {
        let mut c = criteria(3, &[], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(11, "b"), None);
        assert_eq!(c.check(12, "c"), Some(FinishReason::Length));
        assert_eq!(c.generated(), 3);
    }

    #[test]
    fn every_eos_id_stops_unless_ignored() {
        assert_eq!(
            criteria(9, &[], false).check(2, ""),
            Some(FinishReason::EosToken)
        );
        assert_eq!(
            criteria(9, &[], false).check(7, ""),
            Some(FinishReason::EosToken)
        );
        assert_eq!(criteria(9, &[], true).check(7, ""), None);
        assert_eq!(
            criteria(1, &[], false).check(7, ""),
            Some(FinishReason::EosToken)
        );
    }

    #[test]
    fn stop_sequence_straddling_tokens() {
        let mut c = criteria(50, &["Paris."], false);
        for piece in [" The", " capital", " is", " Pa"] {
            assert_eq!(c.check(100, piece), None, "{piece}");
        }
        assert_eq!(c.check(101, "ris"), None);
        assert_eq!(c.check(102, ".\n"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn stop_sequence_inside_one_token_and_with_empty_pieces() {
        assert_eq!(
            criteria(50, &["cat"], false).check(1, "concatenate"),
            Some(FinishReason::StopSequence)
        );
        let mut c = criteria(50, &["é!"], false);
        assert_eq!(c.check(11, "caf"), None);
        assert_eq!(
            c.check(12, ""),
            None,
            "an incomplete character streams nothing"
        );
        assert_eq!(c.check(13, "é"), None);
        assert_eq!(c.check(14, "!"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn window_trim_respects_char_boundaries() {
        let mut c = criteria(100, &["xyz", "ab"], false);
        for _ in 0..20 {
            assert_eq!(c.check(1, "日本語"), None);
        }
        assert!(c.window.len() <= 2 + "日本語".len());
        assert_eq!(c.check(1, "xy"), None);
        assert_eq!(c.check(1, "z"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn eos_wins_over_length_and_bad_params_are_rejected() {
        assert_eq!(
            criteria(1, &[], false).check(2, ""),
            Some(FinishReason::EosToken)
        );
        let zero = StoppingCriteriaParameters::default();
        assert!(matches!(
            StopParams::from_proto(Some(&zero)),
            Err(Error::InvalidArgument { field, .. }) if field == "stopping_parameters.max_new_tokens"
        ));
        let empty = StoppingCriteriaParameters {
            max_new_tokens: 3,
            stop_sequences: vec![String::new()],
            ignore_eos_token: false,
        };
        assert!(matches!(
            StopParams::from_proto(Some(&empty)),
            Err(Error::InvalidArgument { field, .. }) if field == "stopping_parameters.stop_sequences"
        ));
        assert!(StopParams::from_proto(None).is_err());
    }
}
