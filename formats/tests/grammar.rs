//! Grammars against real vocabularies: SmolLM2's byte-level one and a SentencePiece one (the Gemma 2
//! fixture). A valid answer's own tokens pass every mask and end on EOS; the rest are refused; bad
//! grammars fail with llguidance's reason.

mod common;

use std::path::Path;
use tessera_formats::grammar::{token_bytes, Grammar, GrammarCompiler, GrammarKind};
use tessera_formats::tokenizer::load_tokenizer;
use tokenizers::Tokenizer;

const SMOLLM2_EOS: u32 = 2;

fn smollm2() -> (Tokenizer, GrammarCompiler) {
    let tokenizer = load_tokenizer(&common::smollm2_gguf()).unwrap();
    let compiler = GrammarCompiler::new(&tokenizer, 49152, &[SMOLLM2_EOS]).unwrap();
    (tokenizer, compiler)
}

fn json(schema: serde_json::Value) -> Grammar {
    Grammar {
        kind: GrammarKind::Json,
        source: schema.to_string(),
    }
}

fn regex(source: &str) -> Grammar {
    Grammar {
        kind: GrammarKind::Regex,
        source: source.into(),
    }
}

/// Feeds `text`'s tokens through the grammar; true when each was allowed and EOS ends it.
fn accepts(
    compiler: &GrammarCompiler,
    tokenizer: &Tokenizer,
    grammar: &Grammar,
    text: &str,
) -> bool {
    let mut c = compiler.compile(grammar).unwrap();
    for &id in tokenizer.encode(text, false).unwrap().get_ids() {
        if !c.mask().allows(id) {
            return false;
        }
        c.commit(id);
    }
    c.mask().allows(SMOLLM2_EOS)
}

#[test]
fn byte_level_pieces_spell_their_text() {
    let (tokenizer, _) = smollm2();
    let words = token_bytes(&tokenizer, 49152).unwrap();
    assert_eq!(words.len(), 49152);
    for text in [" hello", "{\"", " world", "\n", "é"] {
        for &id in tokenizer.encode(text, false).unwrap().get_ids() {
            let decoded = tokenizer.decode(&[id], false).unwrap();
            if !decoded.contains('\u{fffd}') {
                assert_eq!(words[id as usize], decoded.as_bytes(), "token {id}");
            }
        }
    }
    // `<|im_end|>` is special: llguidance's marker byte, then its text.
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap() as usize;
    assert_eq!(words[im_end], b"\xff<|im_end|>");
}

#[test]
fn sentencepiece_pieces_spell_their_text() {
    let dir = common::repo_root().join("tests/fixtures/families/gemma2");
    let tokenizer = load_tokenizer(Path::new(&dir)).unwrap();
    let words = token_bytes(&tokenizer, tokenizer.get_vocab_size(true)).unwrap();
    let hello = tokenizer.encode("hello world", false).unwrap();
    let spelled: Vec<u8> = hello
        .get_ids()
        .iter()
        .flat_map(|&i| words[i as usize].clone())
        .collect();
    assert_eq!(
        String::from_utf8(spelled).unwrap().trim_start(),
        "hello world"
    );
    let newline = tokenizer.token_to_id("<0x0A>").unwrap() as usize;
    assert_eq!(words[newline], b"\n");
}

#[test]
fn json_schema_allows_valid_answers_only() {
    let (tokenizer, compiler) = smollm2();
    let schema = json(serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false
    }));
    assert!(accepts(
        &compiler,
        &tokenizer,
        &schema,
        r#"{"name": "Ada", "age": 36}"#
    ));
    assert!(!accepts(
        &compiler,
        &tokenizer,
        &schema,
        r#"{"name": "Ada", "age": "36"}"#
    ));
    assert!(!accepts(
        &compiler,
        &tokenizer,
        &schema,
        r#"{"name": "Ada"}"#
    ));
    assert!(!accepts(&compiler, &tokenizer, &schema, "Sure! Here it is"));
}

#[test]
fn regex_must_match_the_whole_output_then_end() {
    let (tokenizer, compiler) = smollm2();
    let digits = regex("[0-9]{3}-[a-z]+");
    assert!(accepts(&compiler, &tokenizer, &digits, "123-abc"));
    assert!(!accepts(&compiler, &tokenizer, &digits, "12-abc"));
    let mut c = compiler.compile(&regex("yes|no")).unwrap();
    for &id in tokenizer.encode("yes", false).unwrap().get_ids() {
        c.commit(id);
    }
    assert!(c.is_complete(), "nothing can follow a complete `yes`");
    let mask = c.mask();
    assert!(mask.allows(SMOLLM2_EOS));
    let mut logits = vec![1.0f32; 49152];
    mask.apply(&mut logits);
    assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
}

#[test]
fn bad_grammars_name_their_problem() {
    let (_, compiler) = smollm2();
    let cases = [
        regex("(unclosed"),
        json(serde_json::json!({"type": "no-such-type"})),
        Grammar {
            kind: GrammarKind::Json,
            source: "{not json".into(),
        },
        json(serde_json::json!([1, 2])),
        json(serde_json::json!({"$ref": "#/definitions/missing"})),
    ];
    for grammar in cases {
        let e = compiler.check(&grammar).unwrap_err();
        assert!(!e.0.is_empty() && !e.0.contains('\n'), "{grammar:?}: {e}");
    }
    // Past llguidance's size budget (a 1.2 MB schema, under the router's 2 MB body limit): refused
    // at once, not compiled for ever.
    let mut props = serde_json::Map::new();
    for i in 0..20_000 {
        props.insert(
            format!("p{i}"),
            serde_json::json!({"type": "string", "pattern": "[a-z]{3,9}[0-9]+"}),
        );
    }
    let required: Vec<&String> = props.keys().collect();
    let huge =
        json(serde_json::json!({"type": "object", "properties": props, "required": required}));
    let t = std::time::Instant::now();
    let e = compiler.check(&huge).unwrap_err();
    assert!(e.0.contains("too large"), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    // The cache keeps compiling the same source to the same answer.
    let ok = regex("a+");
    compiler.check(&ok).unwrap();
    compiler.check(&ok).unwrap();
}

#[test]
fn tgi_routers_schema_regexes_compile() {
    // TGI's router turns a JSON schema into a regex (outlines-core) and sends GRAMMAR_TYPE_REGEX: the
    // shard must take that dialect (escaped braces, `[ ]?`, control-character classes, `(?:…)`).
    let (tokenizer, compiler) = smollm2();
    let outlines = regex(
        r#"\{[ ]?"name"[ ]?:[ ]?"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\])*"[ ]?,[ ]?"age"[ ]?:[ ]?(-)?(0|[1-9][0-9]*)(?:[ ]?,[ ]?"tags"[ ]?:[ ]?\[[ ]?(("([^"\\\x00-\x1F\x7F-\x9F]|\\["\\])*")(,[ ]?("([^"\\\x00-\x1F\x7F-\x9F]|\\["\\])*")){0,})?[ ]?\])?[ ]?\}"#,
    );
    compiler.check(&outlines).unwrap();
    assert!(accepts(
        &compiler,
        &tokenizer,
        &outlines,
        r#"{"name": "Ada", "age": 36}"#
    ));
    assert!(accepts(
        &compiler,
        &tokenizer,
        &outlines,
        r#"{"name":"Ada","age":-1,"tags":["x", "y"]}"#
    ));
    assert!(!accepts(
        &compiler,
        &tokenizer,
        &outlines,
        r#"{"name": "Ada", "age": 036}"#
    ));
}
