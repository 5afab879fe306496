//! multipart/related bodies (RFC 2387), as STOW-RS sends them and WADO-RS answers, split
//! into their parts as the bytes arrive: a part is handed on as soon as the delimiter after
//! it is seen, so a request is never held whole in memory, only the part being read.

use bytes::Bytes;
use memchr::memmem::Finder;

/// The boundary parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Result<String, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| v.trim().trim_matches('"').to_string())
        })
        .ok_or("the multipart/related content type has no boundary")?;
    if boundary.is_empty() {
        return Err("the multipart boundary is empty".into());
    }
    Ok(boundary)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (a preamble is ignored).
    Preamble,
    /// At a delimiter: it opens the next part or, followed by `--`, closes the body.
    Delimiter,
    /// Inside a part; the next delimiter is searched for from `searched` on.
    Part { searched: usize },
    /// After the closing delimiter (an epilogue is ignored).
    Done,
}

/// Splits a multipart body fed in pieces of any size into (content type, bytes) parts.
///
/// Each part is copied once, from the chunks of the body into a buffer of its own, and handed
/// on without another copy (its bytes are a slice of that buffer). The buffers come from
/// [`medledger_store::pool`], sized after the last part (the parts of one request, the slices
/// of a series, are alike), and go back there once the part is stored: a fresh allocation
/// per part would have the kernel zero fresh pages for every one of them, which cost more
/// than all the rest of reading a STOW-RS body.
#[derive(Debug)]
pub struct Splitter {
    delimiter: Vec<u8>,
    finder: Finder<'static>,
    /// What has arrived and is not handed on yet, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    state: State,
    max_part: usize,
    /// Bytes of the last part read, headers included.
    last_part: usize,
}

/// Room reserved beyond the size of the last part: the rest of the chunk that ends a part.
const SLACK: usize = 64 << 10;

impl Splitter {
    /// A splitter for `boundary` that refuses parts larger than `max_part` bytes.
    pub fn new(boundary: &str, max_part: usize) -> Splitter {
        let delimiter = format!("--{boundary}").into_bytes();
        Splitter {
            finder: Finder::new(&delimiter).into_owned(),
            delimiter,
            buf: Vec::new(),
            pos: 0,
            state: State::Preamble,
            max_part,
            last_part: 0,
        }
    }

    /// Moves what is not handed on yet to the front of a new buffer with room for `room`
    /// bytes; returns the old buffer.
    fn renew(&mut self, room: usize) -> Vec<u8> {
        let rest = self.buf.len() - self.pos;
        let mut next = medledger_store::pool::take(rest + room);
        next.extend_from_slice(&self.buf[self.pos..]);
        self.pos = 0;
        std::mem::replace(&mut self.buf, next)
    }

    /// Takes the next bytes of the body; returns the parts they complete, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<(String, Bytes)>, String> {
        let mut parts = Vec::new();
        if self.state == State::Done {
            return Ok(parts);
        }
        self.buf.extend_from_slice(chunk);
        let d = self.delimiter.len();
        loop {
            match self.state {
                State::Preamble => match self.finder.find(&self.buf[self.pos..]) {
                    Some(at) => {
                        self.pos += at;
                        self.state = State::Delimiter;
                    }
                    None => {
                        // Keep only what could still begin a delimiter.
                        let keep = (self.buf.len() - self.pos).min(d - 1);
                        self.buf.drain(..self.buf.len() - keep);
                        self.pos = 0;
                        return Ok(parts);
                    }
                },
                State::Delimiter => {
                    let Some(after) = self.buf.get(self.pos + d..self.pos + d + 2) else {
                        return Ok(parts);
                    };
                    if after == b"--" {
                        self.state = State::Done;
                        self.buf = Vec::new();
                        self.pos = 0;
                        return Ok(parts);
                    }
                    if after != b"\r\n" {
                        return Err("a multipart delimiter is not followed by CRLF".into());
                    }
                    self.pos += d + 2;
                    // The part gets a buffer of its own, as large as the last one.
                    let room = if self.last_part > 0 {
                        self.last_part.min(self.max_part) + SLACK
                    } else {
                        SLACK
                    };
                    let old = self.renew(room);
                    medledger_store::pool::give(old);
                    self.state = State::Part { searched: 0 };
                }
                State::Part { searched } => {
                    match self.finder.find(&self.buf[self.pos + searched..]) {
                        Some(at) => {
                            let end = self.pos + searched + at;
                            self.last_part = end - self.pos;
                            let start = self.pos;
                            self.pos = end;
                            // What follows the part (the delimiter on) moves to a small buffer;
                            // the part keeps this one.
                            let whole = Bytes::from(self.renew(SLACK));
                            let mut part = whole.slice(start..end);
                            drop(whole);
                            // The part ends with the CRLF that precedes the delimiter.
                            if part.ends_with(b"\r\n") {
                                part.truncate(part.len() - 2);
                            }
                            parts.push(split_part(part)?);
                            self.state = State::Delimiter;
                        }
                        None => {
                            let have = self.buf.len() - self.pos;
                            if have > self.max_part {
                                return Err(if self.max_part >= 1 << 20 {
                                    format!("a part is larger than {} MiB", self.max_part >> 20)
                                } else {
                                    format!("a part is larger than {} bytes", self.max_part)
                                });
                            }
                            let searched = have.saturating_sub(d - 1);
                            self.state = State::Part { searched };
                            return Ok(parts);
                        }
                    }
                }
                State::Done => return Ok(parts),
            }
        }
    }

    /// The body has ended: an error unless it was closed by its final delimiter.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            State::Done => Ok(()),
            State::Preamble => Err("the body holds no part with the declared boundary".into()),
            _ => Err("the multipart body ends without its closing delimiter".into()),
        }
    }
}

/// A part's headers and body: (its Content-Type, or "" if it has none; its bytes).
fn split_part(part: Bytes) -> Result<(String, Bytes), String> {
    let (head_end, body_start) = memchr::memmem::find(&part, b"\r\n\r\n")
        .map(|p| (p, p + 4))
        .or_else(|| part.starts_with(b"\r\n").then_some((0, 2)))
        .ok_or("a part has no header/body separator")?;
    let head = String::from_utf8_lossy(&part[..head_end]);
    let ct = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((ct, part.slice(body_start..)))
}

/// Splits a whole multipart/related body into (content type, bytes) parts.
pub fn split(content_type: &str, body: &[u8]) -> Result<Vec<(String, Bytes)>, String> {
    let mut s = Splitter::new(&boundary(content_type)?, usize::MAX);
    let parts = s.push(body)?;
    s.finish()?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble, ignored\r\n".to_vec();
        for (ct, bytes) in parts {
            out.extend_from_slice(format!("--{b}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{b}--\r\nepilogue").as_bytes());
        out
    }

    /// Fed whole or in pieces of any size, a body gives the same parts.
    #[test]
    fn pieces_of_any_size_give_the_same_parts() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let parts: Vec<(&str, &[u8])> = vec![
            ("application/dicom", b"first\r\n-- not a delimiter --"),
            ("application/dicom", &big),
            ("application/octet-stream", b""),
        ];
        let b = "medledger-7f3a";
        let whole = body(b, &parts);
        let ct = format!("multipart/related; type=\"application/dicom\"; boundary=\"{b}\"");
        let want: Vec<(String, Bytes)> = parts
            .iter()
            .map(|(ct, bytes)| (ct.to_string(), Bytes::copy_from_slice(bytes)))
            .collect();
        assert_eq!(split(&ct, &whole).unwrap(), want);
        for size in [1, 2, 3, 7, 13, 64, 4096, 65_537] {
            let mut s = Splitter::new(b, 1 << 20);
            let mut got = Vec::new();
            for chunk in whole.chunks(size) {
                got.extend(s.push(chunk).unwrap());
            }
            s.finish().unwrap();
            assert_eq!(got, want, "pieces of {size}");
            // Each part owns its buffer alone (it can go back to the pool once stored), even
            // while the splitter lives.
            for (_, part) in got.into_iter().filter(|(_, b)| !b.is_empty()) {
                assert!(
                    part.try_into_mut().is_ok(),
                    "pieces of {size}: a part shares"
                );
            }
        }
    }

    #[test]
    fn damaged_bodies_are_refused_with_a_reason() {
        let b = "xyz";
        let ct = "multipart/related; boundary=xyz";
        let ok = body(b, &[("application/dicom", b"abc")]);
        let cut = &ok[..ok.len() - 12];
        assert!(split(ct, cut).unwrap_err().contains("closing delimiter"));
        assert!(
            split(ct, b"no parts at all")
                .unwrap_err()
                .contains("no part")
        );
        assert!(split(ct, b"--xyzjunk").unwrap_err().contains("CRLF"));
        assert!(
            split(ct, b"--xyz\r\nno separator\r\n--xyz--")
                .unwrap_err()
                .contains("separator")
        );
        assert!(
            split("multipart/related", &ok)
                .unwrap_err()
                .contains("no boundary")
        );
        assert!(
            split("multipart/related; boundary=", &ok)
                .unwrap_err()
                .contains("empty")
        );
        // A part larger than the limit is refused before it is read whole.
        let mut s = Splitter::new(b, 100);
        let big = body(b, &[("application/dicom", &[7u8; 1000])]);
        let err = big
            .chunks(50)
            .map(|c| s.push(c))
            .find_map(Result::err)
            .expect("refused");
        assert!(err.contains("larger than"), "{err}");
    }
}
