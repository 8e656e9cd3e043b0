//! etcdctl's textual transaction format, read from standard input:
//!
//! ```text
//! value("k1") = "v1"        <- compares, one per line
//!                           <- blank line
//! put k1 v2                 <- operations if every compare holds
//! get k1
//!                           <- blank line
//! put k1 "fallback value"   <- operations otherwise
//!                           <- blank line (or end of input)
//! ```
//!
//! Compare targets: `ver`/`version`, `c`/`create`, `m`/`mod`, `val`/`value`, `lease` (hex);
//! operators `=` (`==`), `!=`, `>`, `<`; key and value in double quotes with Go escapes.
//! Operations are `put`, `get` and `del` command lines with the same flags as the commands.

use std::io::{BufRead, Write};

use bytes::Bytes;
use clap::Parser;
use flotilla_proto::etcdserverpb::{Compare, RequestOp, TxnRequest, compare, request_op};

use super::{DelArgs, GetArgs, InvalidInput, PutArgs};

/// One operation line, parsed with the commands' own argument definitions.
#[derive(Parser, Debug)]
#[command(no_binary_name = true, disable_help_subcommand = true)]
enum OperationLine {
    Put(PutArgs),
    Get(GetArgs),
    Del(DelArgs),
}

/// Reads the three sections of a transaction. With `prompts`, each section is announced
/// first, as `etcdctl txn -i` does.
pub(crate) fn read_txn(
    input: &mut dyn BufRead,
    mut prompts: Option<&mut dyn Write>,
) -> Result<TxnRequest, InvalidInput> {
    let mut prompt = |text: &str| {
        if let Some(out) = prompts.as_mut() {
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    };
    prompt("compares:");
    let compare = read_section(input)?
        .iter()
        .map(|line| parse_compare(line))
        .collect::<Result<_, _>>()?;
    prompt("success requests (get, put, del):");
    let success = read_operations(input)?;
    prompt("failure requests (get, put, del):");
    let failure = read_operations(input)?;
    Ok(TxnRequest {
        compare,
        success,
        failure,
    })
}

fn read_operations(input: &mut dyn BufRead) -> Result<Vec<RequestOp>, InvalidInput> {
    read_section(input)?
        .iter()
        .map(|line| parse_operation(line))
        .collect()
}

/// Lines up to a blank line or the end of input.
fn read_section(input: &mut dyn BufRead) -> Result<Vec<String>, InvalidInput> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let read = input
            .read_line(&mut line)
            .map_err(|error| InvalidInput(format!("reading the transaction: {error}")))?;
        let line = line.trim();
        if read == 0 || line.is_empty() {
            return Ok(lines);
        }
        lines.push(line.to_string());
    }
}

pub(crate) fn parse_compare(line: &str) -> Result<Compare, InvalidInput> {
    let malformed = || InvalidInput(format!("malformed comparison: {line}"));
    let (target, rest) = line.split_once('(').ok_or_else(malformed)?;
    let (key, rest) = parse_quoted(rest.trim_start()).ok_or_else(malformed)?;
    let rest = rest.trim_start().strip_prefix(')').ok_or_else(malformed)?;
    let mut words = rest.trim_start().splitn(2, char::is_whitespace);
    let operator = words.next().ok_or_else(malformed)?;
    let (value, _ignored) =
        parse_quoted(words.next().unwrap_or("").trim_start()).ok_or_else(malformed)?;
    let result = match operator {
        "=" | "==" => compare::CompareResult::Equal,
        "!=" => compare::CompareResult::NotEqual,
        ">" => compare::CompareResult::Greater,
        "<" => compare::CompareResult::Less,
        _ => {
            return Err(InvalidInput(format!(
                "malformed comparison: {line}; bad operator {operator:?}"
            )));
        }
    };
    let number = |radix: u32| {
        let text = String::from_utf8_lossy(&value).into_owned();
        i64::from_str_radix(&text, radix).map_err(|_| {
            InvalidInput(format!(
                "malformed comparison: {line}; {text:?} is not a number"
            ))
        })
    };
    use compare::{CompareTarget, TargetUnion};
    let (target, union) = match target.trim() {
        "ver" | "version" => (CompareTarget::Version, TargetUnion::Version(number(10)?)),
        "c" | "create" => (
            CompareTarget::Create,
            TargetUnion::CreateRevision(number(10)?),
        ),
        "m" | "mod" => (CompareTarget::Mod, TargetUnion::ModRevision(number(10)?)),
        "val" | "value" => (CompareTarget::Value, TargetUnion::Value(value.into())),
        "lease" => (CompareTarget::Lease, TargetUnion::Lease(number(16)?)),
        other => {
            return Err(InvalidInput(format!(
                "malformed comparison: {line}; unknown target {other:?}"
            )));
        }
    };
    Ok(Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: Bytes::new(),
        target_union: Some(union),
    })
}

fn parse_operation(line: &str) -> Result<RequestOp, InvalidInput> {
    let words =
        split_words(line).ok_or_else(|| InvalidInput(format!("unbalanced quotes in {line:?}")))?;
    let parsed = OperationLine::try_parse_from(&words).map_err(|error| {
        let first_line = error
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        InvalidInput(format!("malformed operation {line:?}: {first_line}"))
    })?;
    let request = match parsed {
        OperationLine::Put(args) if args.value.is_none() => {
            return Err(InvalidInput(format!(
                "malformed operation {line:?}: put needs a key and a value"
            )));
        }
        OperationLine::Put(args) => request_op::Request::RequestPut(args.to_request()?),
        OperationLine::Get(args) => request_op::Request::RequestRange(args.to_request()?),
        OperationLine::Del(args) => request_op::Request::RequestDeleteRange(args.to_request()?),
    };
    Ok(RequestOp {
        request: Some(request),
    })
}

/// Splits a command line into words: blanks separate, double quotes group with Go escapes,
/// single quotes group literally. `None` on an unclosed quote.
pub(crate) fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let mut word = Vec::new();
        while let Some(first) = rest.chars().next() {
            if first.is_whitespace() {
                break;
            }
            if first == '"' {
                let (quoted, after) = parse_quoted(rest)?;
                word.extend_from_slice(&quoted);
                rest = after;
            } else if first == '\'' {
                let end = rest[1..].find('\'')? + 1;
                word.extend_from_slice(&rest.as_bytes()[1..end]);
                rest = &rest[end + 1..];
            } else {
                word.extend_from_slice(first.encode_utf8(&mut [0; 4]).as_bytes());
                rest = &rest[first.len_utf8()..];
            }
        }
        words.push(String::from_utf8_lossy(&word).into_owned());
        rest = rest.trim_start();
    }
    Some(words)
}

/// Parses a Go-quoted string at the start of `text` (double quotes with escapes, or back
/// quotes raw). Returns its bytes and the text after it.
pub(crate) fn parse_quoted(text: &str) -> Option<(Vec<u8>, &str)> {
    if let Some(raw) = text.strip_prefix('`') {
        let end = raw.find('`')?;
        return Some((raw.as_bytes()[..end].to_vec(), &raw[end + 1..]));
    }
    let body = text.strip_prefix('"')?;
    let bytes = body.as_bytes();
    let mut value = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'"' => return Some((value, &body[index + 1..])),
            b'\\' => {
                let (decoded, used) = parse_escape(&bytes[index + 1..])?;
                value.push(decoded);
                index += 1 + used;
            }
            byte => {
                value.push(byte);
                index += 1;
            }
        }
    }
    None
}

/// One escape after a backslash: the byte it stands for and how many bytes it used.
fn parse_escape(bytes: &[u8]) -> Option<(u8, usize)> {
    let hex = |digits: &[u8]| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok();
    let octal = |digits: &[u8]| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok();
    Some(match *bytes.first()? {
        b'n' => (b'\n', 1),
        b't' => (b'\t', 1),
        b'r' => (b'\r', 1),
        b'a' => (0x07, 1),
        b'b' => (0x08, 1),
        b'f' => (0x0c, 1),
        b'v' => (0x0b, 1),
        b'\\' => (b'\\', 1),
        b'"' => (b'"', 1),
        b'\'' => (b'\'', 1),
        b'x' => (hex(bytes.get(1..3)?)?, 3),
        b'0'..=b'7' => (octal(bytes.get(0..3)?)?, 3),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};

    #[test]
    fn compares_in_etcdctl_syntax() {
        let value = parse_compare(r#"value("k1") = "v 1""#).unwrap();
        assert_eq!(value.target, CompareTarget::Value as i32);
        assert_eq!(value.result, CompareResult::Equal as i32);
        assert_eq!(&value.key[..], b"k1");
        assert_eq!(value.target_union, Some(TargetUnion::Value("v 1".into())));

        let created = parse_compare(r#"c("k") != "0""#).unwrap();
        assert_eq!(created.target_union, Some(TargetUnion::CreateRevision(0)));
        assert_eq!(created.result, CompareResult::NotEqual as i32);
        let modified = parse_compare(r#"mod("k") > "5""#).unwrap();
        assert_eq!(modified.target_union, Some(TargetUnion::ModRevision(5)));
        let version = parse_compare(r#"ver("k") < "3""#).unwrap();
        assert_eq!(version.result, CompareResult::Less as i32);
        let lease = parse_compare(r#"lease("k") = "1f""#).unwrap();
        assert_eq!(lease.target_union, Some(TargetUnion::Lease(31)));
    }

    #[test]
    fn malformed_compares_are_refused_like_etcdctl() {
        for line in [
            "bogus",
            "mod(k1) > 0",
            r#"value("k1")="v""#,
            r#"mod("k") ~ "1""#,
            r#"mod("k") > "x""#,
        ] {
            let error = parse_compare(line).unwrap_err();
            assert!(
                error.0.starts_with("malformed comparison"),
                "{line}: {}",
                error.0
            );
        }
    }

    #[test]
    fn words_and_quotes() {
        assert_eq!(
            split_words(r#"put k1 "a b\tc""#).unwrap(),
            ["put", "k1", "a b\tc"]
        );
        assert_eq!(split_words("put  'x y'  z").unwrap(), ["put", "x y", "z"]);
        assert_eq!(
            split_words(r#"put k "\x41\101""#).unwrap(),
            ["put", "k", "AA"]
        );
        assert!(split_words(r#"put k "open"#).is_none());
    }

    #[test]
    fn a_whole_transaction_from_input() {
        let text = "value(\"k1\") = \"v1\"\n\nput k1 v2\nget k1 --prefix\n\ndel k1\n\n";
        let txn = read_txn(&mut text.as_bytes(), None).unwrap();
        assert_eq!(txn.compare.len(), 1);
        assert_eq!(txn.success.len(), 2);
        let Some(request_op::Request::RequestRange(range)) = &txn.success[1].request else {
            panic!("expected a range: {:?}", txn.success[1]);
        };
        assert_eq!(&range.range_end[..], b"k2");
        assert!(matches!(
            txn.failure[0].request,
            Some(request_op::Request::RequestDeleteRange(_))
        ));
    }

    #[test]
    fn empty_sections_and_end_of_input_are_fine() {
        let txn = read_txn(&mut "\n\nput a b\n".as_bytes(), None).unwrap();
        assert!(txn.compare.is_empty());
        assert_eq!(txn.failure.len(), 1);
    }

    #[test]
    fn interactive_prompts() {
        let mut prompts = Vec::new();
        read_txn(&mut "\n\n\n".as_bytes(), Some(&mut prompts)).unwrap();
        assert_eq!(
            String::from_utf8(prompts).unwrap(),
            "compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n"
        );
    }

    #[test]
    fn bad_operations_are_invalid_input() {
        let error = read_txn(&mut "\nfrobnicate k\n".as_bytes(), None).unwrap_err();
        assert!(error.0.contains("malformed operation"), "{}", error.0);
        let error = read_txn(&mut "\nput onlykey\n".as_bytes(), None).unwrap_err();
        assert!(error.0.contains("value"), "{}", error.0);
    }
}
