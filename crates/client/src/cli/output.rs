//! Printing responses as etcdctl 3.4 does, in its `simple`, `json` and `table` formats.
//!
//! JSON follows etcdctl's (Go's encoding of the protobuf structs): snake_case fields for KV
//! messages, camelCase ones for members and status, zero values left out, bytes in base64.

use std::io::{self, Write};

use flotilla_proto::etcdserverpb::{
    DeleteRangeResponse, Member, PutResponse, RangeResponse, ResponseHeader, StatusResponse,
    TxnResponse, response_op,
};
use flotilla_proto::mvccpb::KeyValue;
use serde_json::{Map, Value, json};

/// `-w/--write-out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Simple,
    Json,
    Table,
}

// --- simple ---------------------------------------------------------------------------------

pub(crate) fn simple_kvs(
    out: &mut dyn Write,
    kvs: &[KeyValue],
    value_only: bool,
) -> io::Result<()> {
    for kv in kvs {
        if !value_only {
            out.write_all(&kv.key)?;
            out.write_all(b"\n")?;
        }
        out.write_all(&kv.value)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

pub(crate) fn simple_range(
    out: &mut dyn Write,
    response: &RangeResponse,
    value_only: bool,
) -> io::Result<()> {
    simple_kvs(out, &response.kvs, value_only)
}

pub(crate) fn simple_put(out: &mut dyn Write, response: &PutResponse) -> io::Result<()> {
    writeln!(out, "OK")?;
    if let Some(prev) = &response.prev_kv {
        simple_kvs(out, std::slice::from_ref(prev), false)?;
    }
    Ok(())
}

pub(crate) fn simple_delete(out: &mut dyn Write, response: &DeleteRangeResponse) -> io::Result<()> {
    writeln!(out, "{}", response.deleted)?;
    simple_kvs(out, &response.prev_kvs, false)
}

/// SUCCESS or FAILURE, then each response after a blank line.
pub(crate) fn simple_txn(out: &mut dyn Write, response: &TxnResponse) -> io::Result<()> {
    writeln!(
        out,
        "{}",
        if response.succeeded {
            "SUCCESS"
        } else {
            "FAILURE"
        }
    )?;
    for op in &response.responses {
        writeln!(out)?;
        match &op.response {
            Some(response_op::Response::ResponsePut(put)) => simple_put(out, put)?,
            Some(response_op::Response::ResponseRange(range)) => simple_range(out, range, false)?,
            Some(response_op::Response::ResponseDeleteRange(delete)) => simple_delete(out, delete)?,
            Some(response_op::Response::ResponseTxn(txn)) => simple_txn(out, txn)?,
            None => writeln!(out, "unexpected empty response")?,
        }
    }
    Ok(())
}

/// `ID, status, name, peer URLs, client URLs, is learner`, one member per line.
pub(crate) fn simple_members(out: &mut dyn Write, members: &[Member]) -> io::Result<()> {
    for row in member_rows(members) {
        writeln!(out, "{}", row.join(", "))?;
    }
    Ok(())
}

pub(crate) fn member_rows(members: &[Member]) -> Vec<Vec<String>> {
    members
        .iter()
        .map(|member| {
            let started = if member.name.is_empty() {
                "unstarted"
            } else {
                "started"
            };
            vec![
                format!("{:x}", member.id),
                started.to_string(),
                member.name.clone(),
                member.peer_urls.join(","),
                member.client_urls.join(","),
                member.is_learner.to_string(),
            ]
        })
        .collect()
}

pub(crate) const MEMBER_HEADERS: [&str; 6] = [
    "ID",
    "STATUS",
    "NAME",
    "PEER ADDRS",
    "CLIENT ADDRS",
    "IS LEARNER",
];

/// etcdctl's `endpoint status` columns, with the leader's id and the store revision added
/// before the errors.
pub(crate) const STATUS_HEADERS: [&str; 12] = [
    "ENDPOINT",
    "ID",
    "VERSION",
    "DB SIZE",
    "IS LEADER",
    "IS LEARNER",
    "RAFT TERM",
    "RAFT INDEX",
    "RAFT APPLIED INDEX",
    "LEADER",
    "REVISION",
    "ERRORS",
];

pub(crate) fn status_row(endpoint: &str, status: &StatusResponse) -> Vec<String> {
    let header = status.header.unwrap_or_default();
    vec![
        endpoint.to_string(),
        format!("{:x}", header.member_id),
        status.version.clone(),
        human_bytes(status.db_size.max(0) as u64),
        (status.leader != 0 && header.member_id == status.leader).to_string(),
        status.is_learner.to_string(),
        status.raft_term.to_string(),
        status.raft_index.to_string(),
        status.raft_applied_index.to_string(),
        format!("{:x}", status.leader),
        header.revision.to_string(),
        status.errors.join(", "),
    ]
}

/// Sizes as Go's humanize.Bytes prints them (SI units): "20 kB", "1.5 MB".
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 10 {
        return format!("{bytes} B");
    }
    let exponent = ((bytes as f64).log10() / 3.0).floor() as usize;
    let exponent = exponent.min(UNITS.len() - 1);
    let value = (bytes as f64 / 1000f64.powi(exponent as i32) * 10.0 + 0.5).floor() / 10.0;
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[exponent])
    } else {
        format!("{value:.0} {}", UNITS[exponent])
    }
}

// --- table ----------------------------------------------------------------------------------

/// A bordered table as etcdctl draws it: headers centred, cells right-aligned.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(column, header)| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .chain([header.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let border: String = widths
        .iter()
        .map(|width| format!("+{}", "-".repeat(width + 2)))
        .chain(["+\n".to_string()])
        .collect();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .map(|cell| format!("| {cell} "))
            .chain(["|\n".to_string()])
            .collect()
    };
    let centred = headers
        .iter()
        .zip(&widths)
        .map(|(header, width)| {
            let gap = width - header.chars().count();
            format!(
                "{}{header}{}",
                " ".repeat(gap / 2),
                " ".repeat(gap - gap / 2)
            )
        })
        .collect();
    let mut text = border.clone();
    text += &line(centred);
    text += &border;
    for row in rows {
        let aligned = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:>width$}"))
            .collect();
        text += &line(aligned);
    }
    text += &border;
    text
}

// --- json -----------------------------------------------------------------------------------

pub(crate) fn write_json(out: &mut dyn Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)
}

/// Builds a JSON object, leaving out zero values as Go's `omitempty` does.
#[derive(Default)]
struct Object(Map<String, Value>);

impl Object {
    fn number(mut self, name: &str, value: impl Into<i128>) -> Self {
        let value = value.into();
        if value != 0 {
            let number = if value < 0 {
                json!(value as i64)
            } else {
                json!(value as u64)
            };
            self.0.insert(name.into(), number);
        }
        self
    }

    fn flag(mut self, name: &str, value: bool) -> Self {
        if value {
            self.0.insert(name.into(), Value::Bool(true));
        }
        self
    }

    fn bytes(mut self, name: &str, value: &[u8]) -> Self {
        if !value.is_empty() {
            self.0.insert(name.into(), Value::String(base64(value)));
        }
        self
    }

    fn text(mut self, name: &str, value: &str) -> Self {
        if !value.is_empty() {
            self.0.insert(name.into(), Value::String(value.into()));
        }
        self
    }

    fn value(mut self, name: &str, value: Option<Value>) -> Self {
        if let Some(value) = value {
            self.0.insert(name.into(), value);
        }
        self
    }

    fn list(mut self, name: &str, values: Vec<Value>) -> Self {
        if !values.is_empty() {
            self.0.insert(name.into(), Value::Array(values));
        }
        self
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

pub(crate) fn header_json(header: Option<&ResponseHeader>) -> Option<Value> {
    let header = header?;
    Some(
        Object::default()
            .number("cluster_id", header.cluster_id)
            .number("member_id", header.member_id)
            .number("revision", header.revision)
            .number("raft_term", header.raft_term)
            .done(),
    )
}

pub(crate) fn kv_json(kv: &KeyValue) -> Value {
    Object::default()
        .bytes("key", &kv.key)
        .number("create_revision", kv.create_revision)
        .number("mod_revision", kv.mod_revision)
        .number("version", kv.version)
        .bytes("value", &kv.value)
        .number("lease", kv.lease)
        .done()
}

pub(crate) fn range_json(response: &RangeResponse) -> Value {
    Object::default()
        .value("header", header_json(response.header.as_ref()))
        .list("kvs", response.kvs.iter().map(kv_json).collect())
        .flag("more", response.more)
        .number("count", response.count)
        .done()
}

pub(crate) fn put_json(response: &PutResponse) -> Value {
    Object::default()
        .value("header", header_json(response.header.as_ref()))
        .value("prev_kv", response.prev_kv.as_ref().map(kv_json))
        .done()
}

pub(crate) fn delete_json(response: &DeleteRangeResponse) -> Value {
    Object::default()
        .value("header", header_json(response.header.as_ref()))
        .number("deleted", response.deleted)
        .list("prev_kvs", response.prev_kvs.iter().map(kv_json).collect())
        .done()
}

pub(crate) fn txn_json(response: &TxnResponse) -> Value {
    let responses = response
        .responses
        .iter()
        .map(|op| {
            let (name, inner) = match &op.response {
                Some(response_op::Response::ResponsePut(put)) => ("ResponsePut", put_json(put)),
                Some(response_op::Response::ResponseRange(range)) => {
                    ("ResponseRange", range_json(range))
                }
                Some(response_op::Response::ResponseDeleteRange(delete)) => {
                    ("ResponseDeleteRange", delete_json(delete))
                }
                Some(response_op::Response::ResponseTxn(txn)) => ("ResponseTxn", txn_json(txn)),
                None => return json!({}),
            };
            json!({ "Response": { name: inner } })
        })
        .collect();
    Object::default()
        .value("header", header_json(response.header.as_ref()))
        .flag("succeeded", response.succeeded)
        .list("responses", responses)
        .done()
}

pub(crate) fn member_json(member: &Member) -> Value {
    let urls = |urls: &[String]| urls.iter().map(|url| Value::String(url.clone())).collect();
    Object::default()
        .number("ID", member.id)
        .text("name", &member.name)
        .list("peerURLs", urls(&member.peer_urls))
        .list("clientURLs", urls(&member.client_urls))
        .flag("isLearner", member.is_learner)
        .done()
}

pub(crate) fn members_json(header: Option<&ResponseHeader>, members: &[Member]) -> Value {
    Object::default()
        .value("header", header_json(header))
        .list("members", members.iter().map(member_json).collect())
        .done()
}

pub(crate) fn status_json(status: &StatusResponse) -> Value {
    let errors = status
        .errors
        .iter()
        .map(|error| Value::String(error.clone()))
        .collect();
    Object::default()
        .value("header", header_json(status.header.as_ref()))
        .text("version", &status.version)
        .number("dbSize", status.db_size)
        .number("leader", status.leader)
        .number("raftIndex", status.raft_index)
        .number("raftTerm", status.raft_term)
        .number("raftAppliedIndex", status.raft_applied_index)
        .list("errors", errors)
        .number("dbSizeInUse", status.db_size_in_use)
        .flag("isLearner", status.is_learner)
        .done()
}

pub(crate) fn header_only_json(header: Option<&ResponseHeader>) -> Value {
    Object::default()
        .value("header", header_json(header))
        .done()
}

/// Standard base64 with padding, as Go encodes `[]byte` in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let buffer = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let bits = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]);
        for position in 0..4 {
            if position <= chunk.len() {
                let index = (bits >> (18 - 6 * position)) & 0x3f;
                text.push(ALPHABET[index as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_go() {
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foo2"), "Zm9vMg==");
        assert_eq!(base64(b"bar 2"), "YmFyIDI=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn sizes_like_humanize() {
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(20480), "20 kB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(999), "999 B");
    }

    /// The exact table `etcdctl member list -w table` printed for one member.
    #[test]
    fn tables_like_etcdctl() {
        let member = Member {
            id: 0xbdae9bbc11dd390d,
            name: "e1".into(),
            peer_urls: vec!["http://127.0.0.1:23801".into()],
            client_urls: vec!["http://127.0.0.1:23791".into()],
            is_learner: false,
        };
        let expected = "\
+------------------+---------+------+------------------------+------------------------+------------+
|        ID        | STATUS  | NAME |       PEER ADDRS       |      CLIENT ADDRS      | IS LEARNER |
+------------------+---------+------+------------------------+------------------------+------------+
| bdae9bbc11dd390d | started |   e1 | http://127.0.0.1:23801 | http://127.0.0.1:23791 |      false |
+------------------+---------+------+------------------------+------------------------+------------+
";
        assert_eq!(table(&MEMBER_HEADERS, &member_rows(&[member])), expected);
    }

    /// The JSON etcdctl printed for a two-key range.
    #[test]
    fn range_json_like_etcdctl() {
        let kv = |key: &str, value: &str, revision| KeyValue {
            key: key.to_string().into(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            value: value.to_string().into(),
            lease: 0,
        };
        let response = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 15118495548433857066,
                member_id: 13668033151171901709,
                revision: 3,
                raft_term: 2,
            }),
            kvs: vec![kv("foo", "bar", 2), kv("foo2", "bar 2", 3)],
            more: false,
            count: 2,
        };
        let expected = r#"{"header":{"cluster_id":15118495548433857066,"member_id":13668033151171901709,"revision":3,"raft_term":2},"kvs":[{"key":"Zm9v","create_revision":2,"mod_revision":2,"version":1,"value":"YmFy"},{"key":"Zm9vMg==","create_revision":3,"mod_revision":3,"version":1,"value":"YmFyIDI="}],"count":2}"#;
        assert_eq!(range_json(&response).to_string(), expected);
    }
}
