//! The Python-flavoured globals and filters Hugging Face chat templates call: `raise_exception`,
//! `strftime_now`, and a `tojson` that writes JSON the way Python's `json.dumps` does (transformers
//! renders with `ensure_ascii=False`, `", "`/`": "` separators, optional `indent`).

use std::fmt::Write as _;
use std::io;

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};
use serde::Serialize;

/// The message a template passed to `raise_exception`, kept as the error's source so that
/// rendering can tell a template's own rejection apart from a template bug.
#[derive(Debug)]
pub(crate) struct Raised(pub String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

pub(crate) fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// Local time formatted with a C/Python `strftime` format; an invalid format is a template error.
pub(crate) fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

/// Python's notion of iterable: containers and strings, but not `none` (which minijinja's built-in
/// test accepts, making `tools is iterable and tools | length > 0` fail when no tools are given).
pub(crate) fn is_iterable(value: Value) -> bool {
    use minijinja::value::ValueKind;
    matches!(
        value.kind(),
        ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Iterable
            | ValueKind::String
            | ValueKind::Bytes
    )
}

/// `value | tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`.
pub(crate) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match usize::try_from(v.clone()) {
            Ok(n) => Some(" ".repeat(n)),
            Err(_) => Some(v.as_str().map(str::to_string).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<(String, String)> =
        kwargs.get::<Option<Vec<String>>>("separators")?.map(|s| {
            let mut it = s.into_iter();
            (it.next().unwrap_or_default(), it.next().unwrap_or_default())
        });
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = separators.unwrap_or_else(|| {
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let value = if sort_keys { sorted(&value) } else { value };
    let fmt = PyFormatter {
        item_sep: item_sep.as_bytes(),
        key_sep: key_sep.as_bytes(),
        indent: indent.as_deref().map(str::as_bytes),
        ensure_ascii,
        level: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    // serde_json writes only valid UTF-8.
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// A copy of `value` whose maps list their keys in sorted order (Python's `sort_keys=True`).
fn sorted(value: &Value) -> Value {
    if let Ok(iter) = value.try_iter() {
        if value.kind() == minijinja::value::ValueKind::Map {
            let mut pairs: Vec<(Value, Value)> = iter
                .map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    (k, sorted(&v))
                })
                .collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            return Value::from_iter(pairs);
        }
        if value.kind() == minijinja::value::ValueKind::Seq {
            return Value::from(
                value
                    .try_iter()
                    .into_iter()
                    .flatten()
                    .map(|v| sorted(&v))
                    .collect::<Vec<_>>(),
            );
        }
    }
    value.clone()
}

/// serde_json formatter with Python `json.dumps` separators, indentation and `ensure_ascii`.
struct PyFormatter<'a> {
    item_sep: &'a [u8],
    key_sep: &'a [u8],
    indent: Option<&'a [u8]>,
    ensure_ascii: bool,
    level: usize,
    has_value: bool,
}

impl PyFormatter<'_> {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(c)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep)?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter<'_> {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !self.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}
