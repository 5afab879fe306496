//! PDU transport over a TCP stream.
//!
//! P-DATA-TF PDUs are parsed here item by item so that data set fragments are
//! read straight from the socket buffer into their destination (one copy,
//! linear in the data set size); all other PDUs are decoded by `dicom-ul`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;

use dicom_ul::pdu::{self, Pdu};

use crate::NetError;
use crate::dimse::{self, Command};

/// Largest non-P-DATA PDU we read (an A-ASSOCIATE-RQ with 128 contexts and
/// user items is far below this).
const MAX_CONTROL_PDU: usize = 1024 * 1024;
/// Bytes of the read buffer (see [`Conn::over`]).
const READ_BUFFER: usize = 8 * 1024;
/// Cap for our outgoing PDUs when the peer announces "unlimited" (0).
const MAX_SEND_PDU: u32 = 4 * 1024 * 1024;

/// Header of one presentation data value item.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pdv {
    pub pcid: u8,
    pub command: bool,
    pub last: bool,
    pub len: usize,
}

#[derive(Debug)]
pub(crate) enum Incoming {
    Pdv(Pdv),
    Pdu(Pdu),
}

/// What arrives where a DIMSE command is expected.
#[derive(Debug)]
pub(crate) enum Received {
    Command { pcid: u8, cmd: Command },
    ReleaseRq,
    Aborted,
}

/// What an association runs over: plain TCP, or TLS over TCP (PS3.15 Annex B).
pub(crate) trait Transport: Read + Write + Send + std::fmt::Debug {
    /// The socket underneath (timeouts, blocking mode).
    fn tcp(&self) -> &TcpStream;
    /// Ends the connection (over TLS, with a close_notify first).
    fn finish(&mut self);
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn finish(&mut self) {
        let _ = self.flush();
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
    fn finish(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Debug)]
pub(crate) struct Conn {
    /// Reads are buffered; writes go to the same transport through `get_mut`.
    io: BufReader<Box<dyn Transport>>,
    /// Bytes left in the P-DATA-TF PDU being read.
    pdu_left: usize,
    wbuf: Vec<u8>,
    /// Maximum length of the variable field of PDUs the peer accepts.
    peer_max: u32,
    /// Length of the last data set received: the next one (most often another image of the
    /// same series) is read into a buffer of that size, instead of one grown (and copied)
    /// fragment by fragment.
    data_hint: usize,
}

/// The largest buffer reserved ahead from [`Conn::data_hint`].
const DATA_HINT_MAX: usize = 64 << 20;

impl Conn {
    pub(crate) fn new(stream: TcpStream) -> std::io::Result<Conn> {
        Ok(Conn::over(Box::new(stream)))
    }

    /// A connection over `transport` (TLS: the handshake happens on the first read).
    pub(crate) fn over(transport: Box<dyn Transport>) -> Conn {
        Conn {
            // Small: PDU and item headers and command sets come through it, while a data
            // set's value, once what the buffer holds is copied, is read straight into its
            // destination (`BufReader` reads past its buffer when asked for at least its
            // capacity). With 64 KiB, the second half of each 128 KiB PDU came through the
            // buffer, copied twice.
            io: BufReader::with_capacity(READ_BUFFER, transport),
            pdu_left: 0,
            wbuf: Vec::new(),
            peer_max: pdu::DEFAULT_MAX_PDU,
            data_hint: 0,
        }
    }

    /// The length of the last data set received (see `data_hint`).
    pub(crate) fn data_hint(&self) -> usize {
        self.data_hint
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        self.io.get_ref().tcp()
    }

    pub(crate) fn set_peer_max(&mut self, max: u32) {
        self.peer_max = if max == 0 {
            MAX_SEND_PDU
        } else {
            max.clamp(64, MAX_SEND_PDU)
        };
    }

    fn read_exact_or_closed(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), NetError> {
        match self.io.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && at_boundary => Err(NetError::Closed),
            Err(e) => Err(NetError::Io(e)),
        }
    }

    /// Next PDV header, or the next non-P-DATA PDU.
    pub(crate) fn next(&mut self) -> Result<Incoming, NetError> {
        while self.pdu_left == 0 {
            let mut h = [0u8; 6];
            self.read_exact_or_closed(&mut h, true)?;
            let len = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
            if h[0] == 0x04 {
                self.pdu_left = len;
                continue; // an empty P-DATA-TF is tolerated
            }
            if len > MAX_CONTROL_PDU {
                return Err(NetError::Protocol(format!(
                    "PDU type 0x{:02X} announces {len} bytes",
                    h[0]
                )));
            }
            let mut full = Vec::with_capacity(6 + len);
            full.extend_from_slice(&h);
            let got = (&mut self.io).take(len as u64).read_to_end(&mut full)?;
            if got != len {
                return Err(NetError::Io(ErrorKind::UnexpectedEof.into()));
            }
            return match pdu::read_pdu(&full[..], pdu::MAXIMUM_PDU_SIZE, false) {
                Ok(Some(p)) => Ok(Incoming::Pdu(p)),
                Ok(None) => Err(NetError::Protocol("truncated PDU".into())),
                Err(e) => Err(NetError::PduRead(e)),
            };
        }
        if self.pdu_left < 6 {
            return Err(NetError::Protocol(
                "P-DATA-TF PDU with a truncated item".into(),
            ));
        }
        let mut h = [0u8; 6];
        self.read_exact_or_closed(&mut h, false)?;
        let item_len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if item_len < 2 || item_len > self.pdu_left - 4 {
            return Err(NetError::Protocol(format!(
                "PDV item length {item_len} does not fit its PDU"
            )));
        }
        self.pdu_left -= 4 + item_len;
        Ok(Incoming::Pdv(Pdv {
            pcid: h[4],
            command: h[5] & 0x01 != 0,
            last: h[5] & 0x02 != 0,
            len: item_len - 2,
        }))
    }

    /// Append the value of the PDV just announced by [`next`](Self::next).
    ///
    /// Read with `read_exact` into `dest` itself: what the read buffer holds is copied, the
    /// rest of a large value comes from the socket straight into `dest`. (`read_to_end` on a
    /// `Take` reads 8 KiB, then 16, ..., each through the 64 KiB read buffer: every byte of a
    /// data set copied twice, ten calls into the kernel per image.)
    pub(crate) fn read_value(&mut self, len: usize, dest: &mut Vec<u8>) -> Result<(), NetError> {
        let start = dest.len();
        dest.resize(start + len, 0);
        if let Err(e) = self.io.read_exact(&mut dest[start..]) {
            dest.truncate(start);
            return Err(NetError::Io(e));
        }
        Ok(())
    }

    /// Whether something from the peer is already waiting to be read
    /// (checked without blocking).
    pub(crate) fn has_pending_input(&mut self) -> Result<bool, NetError> {
        if self.pdu_left > 0 || !self.io.buffer().is_empty() {
            return Ok(true);
        }
        self.stream().set_nonblocking(true)?;
        let r = self.io.fill_buf().map(|b| b.len());
        self.stream().set_nonblocking(false)?;
        match r {
            // 0 bytes: the peer closed; let the next read report it.
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Read a complete command set. Data set PDVs before it are a protocol error.
    pub(crate) fn recv_command(&mut self) -> Result<Received, NetError> {
        let mut buf = Vec::new();
        let mut pcid = None;
        loop {
            match self.next()? {
                Incoming::Pdu(Pdu::ReleaseRQ) if pcid.is_none() => return Ok(Received::ReleaseRq),
                Incoming::Pdu(Pdu::AbortRQ { .. }) => return Ok(Received::Aborted),
                Incoming::Pdu(p) => {
                    return Err(NetError::Protocol(format!(
                        "unexpected PDU {}",
                        p.short_description()
                    )));
                }
                Incoming::Pdv(pdv) => {
                    if !pdv.command {
                        return Err(NetError::Protocol(
                            "data set fragment where a command was expected".into(),
                        ));
                    }
                    if *pcid.get_or_insert(pdv.pcid) != pdv.pcid {
                        return Err(NetError::Protocol(
                            "command fragments on different presentation contexts".into(),
                        ));
                    }
                    if buf.len() + pdv.len > dimse::MAX_COMMAND_LEN {
                        return Err(NetError::Protocol("command set too large".into()));
                    }
                    self.read_value(pdv.len, &mut buf)?;
                    if pdv.last {
                        let cmd = Command::decode(&buf).map_err(NetError::Protocol)?;
                        return Ok(Received::Command {
                            pcid: pdv.pcid,
                            cmd,
                        });
                    }
                }
            }
        }
    }

    /// Append the data set following a command to `dest` (at most `cap` bytes).
    pub(crate) fn recv_data(
        &mut self,
        pcid: u8,
        dest: &mut Vec<u8>,
        cap: usize,
    ) -> Result<(), NetError> {
        self.recv_data_watched(pcid, dest, cap, &mut |_| {})
    }

    /// [`Conn::recv_data`], calling `grew` with all of `dest` after each fragment but the
    /// last.
    pub(crate) fn recv_data_watched(
        &mut self,
        pcid: u8,
        dest: &mut Vec<u8>,
        cap: usize,
        grew: &mut dyn FnMut(&[u8]),
    ) -> Result<(), NetError> {
        let start = dest.len();
        dest.reserve(self.data_hint.min(cap));
        loop {
            let pdv = self.next_data_fragment(pcid)?;
            if dest.len() - start + pdv.len > cap {
                return Err(NetError::Protocol(format!(
                    "data set larger than {cap} bytes"
                )));
            }
            dest.reserve(pdv.len);
            self.read_value(pdv.len, dest)?;
            if pdv.last {
                self.data_hint = (dest.len() - start).min(DATA_HINT_MAX);
                return Ok(());
            }
            grew(dest);
        }
    }

    /// Read and drop the data set following a command.
    pub(crate) fn skip_data(&mut self, pcid: u8) -> Result<(), NetError> {
        loop {
            let pdv = self.next_data_fragment(pcid)?;
            let n = std::io::copy(
                &mut (&mut self.io).take(pdv.len as u64),
                &mut std::io::sink(),
            )?;
            if n as usize != pdv.len {
                return Err(NetError::Io(ErrorKind::UnexpectedEof.into()));
            }
            if pdv.last {
                return Ok(());
            }
        }
    }

    /// The header of the next data set fragment on context `pcid`; anything else inside a
    /// data set (an abort, another PDU, a command or another context's fragment) is an error.
    fn next_data_fragment(&mut self, pcid: u8) -> Result<Pdv, NetError> {
        match self.next()? {
            Incoming::Pdu(Pdu::AbortRQ { .. }) => Err(NetError::Aborted),
            Incoming::Pdu(p) => Err(NetError::Protocol(format!(
                "unexpected PDU {} inside a data set",
                p.short_description()
            ))),
            Incoming::Pdv(pdv) if pdv.command || pdv.pcid != pcid => Err(NetError::Protocol(
                "unexpected fragment inside a data set".into(),
            )),
            Incoming::Pdv(pdv) => Ok(pdv),
        }
    }

    pub(crate) fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), NetError> {
        self.wbuf.clear();
        pdu::write_pdu(&mut self.wbuf, pdu).map_err(NetError::PduWrite)?;
        self.io.get_mut().write_all(&self.wbuf)?;
        self.io.get_mut().flush()?;
        Ok(())
    }

    /// Send a message part (command or data set) as P-DATA-TF PDUs no larger
    /// than the peer's maximum.
    fn send_pdata(&mut self, pcid: u8, command: bool, data: &[u8]) -> Result<(), NetError> {
        let max_value = (self.peer_max as usize).saturating_sub(6).max(2);
        let mut chunks = data.chunks(max_value).peekable();
        let mut first = true;
        while first || chunks.peek().is_some() {
            first = false;
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let item_len = chunk.len() + 2;
            self.wbuf.clear();
            self.wbuf.push(0x04);
            self.wbuf.push(0);
            self.wbuf
                .extend_from_slice(&((item_len + 4) as u32).to_be_bytes());
            self.wbuf
                .extend_from_slice(&(item_len as u32).to_be_bytes());
            self.wbuf.push(pcid);
            self.wbuf
                .push(u8::from(command) | if last { 0x02 } else { 0 });
            self.wbuf.extend_from_slice(chunk);
            self.io.get_mut().write_all(&self.wbuf)?;
            self.io.get_mut().flush()?;
        }
        Ok(())
    }

    pub(crate) fn send_command(&mut self, pcid: u8, cmd: &Command) -> Result<(), NetError> {
        self.send_pdata(pcid, true, &cmd.encode())
    }

    pub(crate) fn send_data(&mut self, pcid: u8, data: &[u8]) -> Result<(), NetError> {
        self.send_pdata(pcid, false, data)
    }

    /// Best-effort A-ABORT and close.
    pub(crate) fn abort(&mut self) {
        let _ = self.send_pdu(&Pdu::AbortRQ {
            source: pdu::AbortRQSource::ServiceProvider(
                pdu::AbortRQServiceProviderReason::ReasonNotSpecified,
            ),
        });
        self.close();
    }

    pub(crate) fn close(&mut self) {
        self.io.get_mut().finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// One P-DATA-TF PDU holding `items` (context, last fragment?, value) of a data set.
    fn pdata(items: &[(u8, bool, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (pcid, last, value) in items {
            body.extend_from_slice(&((value.len() + 2) as u32).to_be_bytes());
            body.push(*pcid);
            body.push(if *last { 0x02 } else { 0 });
            body.extend_from_slice(value);
        }
        let mut pdu = vec![0x04, 0];
        pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
        pdu.extend_from_slice(&body);
        pdu
    }

    /// A connection whose peer writes `bytes` and then closes.
    fn receiving(bytes: Vec<u8>) -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // In pieces, so that reads find partial values in the socket.
            for chunk in bytes.chunks(50_000) {
                s.write_all(chunk).unwrap();
                s.flush().unwrap();
            }
        });
        Conn::new(listener.accept().unwrap().0).unwrap()
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_data_set_in_fragments_of_every_size_arrives_whole_after_what_dest_held() {
        let sizes = [
            1,
            100,
            READ_BUFFER - 1,
            READ_BUFFER,
            READ_BUFFER + 1,
            3 * READ_BUFFER + 7,
            200_000,
        ];
        let fragments: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| data(*n, i as u8))
            .collect();
        let mut wire = Vec::new();
        // Two fragments in one PDU, then one per PDU, the last one flagged.
        wire.extend(pdata(&[
            (3, false, &fragments[0]),
            (3, false, &fragments[1]),
        ]));
        for (i, f) in fragments.iter().enumerate().skip(2) {
            wire.extend(pdata(&[(3, i == fragments.len() - 1, f)]));
        }
        let mut conn = receiving(wire);
        let mut dest = b"before".to_vec();
        conn.recv_data(3, &mut dest, usize::MAX).unwrap();
        let mut want = b"before".to_vec();
        for f in &fragments {
            want.extend_from_slice(f);
        }
        assert_eq!(dest.len(), want.len());
        assert!(dest == want, "the data set differs from what was sent");
        assert_eq!(conn.data_hint(), want.len() - 6);
    }

    #[test]
    fn a_watched_data_set_shows_each_fragment_but_the_last_as_it_arrives() {
        let fragments = [data(70_000, 1), data(5, 2), data(130_000, 3)];
        let mut wire = pdata(&[(5, false, &fragments[0]), (5, false, &fragments[1])]);
        wire.extend(pdata(&[(5, true, &fragments[2])]));
        let mut conn = receiving(wire);
        let mut dest = b"head".to_vec();
        let mut seen = Vec::new();
        conn.recv_data_watched(5, &mut dest, usize::MAX, &mut |f| seen.push(f.to_vec()))
            .unwrap();
        let mut first = b"head".to_vec();
        first.extend_from_slice(&fragments[0]);
        let mut second = first.clone();
        second.extend_from_slice(&fragments[1]);
        assert_eq!(
            seen.len(),
            2,
            "after the first two fragments, not after the last"
        );
        assert!(seen[0] == first && seen[1] == second);
        let mut whole = second;
        whole.extend_from_slice(&fragments[2]);
        assert!(dest == whole);
    }

    #[test]
    fn a_value_cut_off_is_an_error_and_leaves_dest_as_it_was() {
        let value = data(100_000, 9);
        let mut wire = pdata(&[(1, true, &value)]);
        wire.truncate(wire.len() - 10_000);
        let mut conn = receiving(wire);
        let mut dest = b"kept".to_vec();
        let e = conn.recv_data(1, &mut dest, usize::MAX).unwrap_err();
        assert!(
            matches!(&e, NetError::Io(io) if io.kind() == ErrorKind::UnexpectedEof),
            "{e:?}"
        );
        assert_eq!(dest, b"kept");
    }

    #[test]
    fn a_data_set_over_the_cap_or_on_another_context_is_refused() {
        let value = data(5_000, 1);
        let mut conn = receiving(pdata(&[(1, true, &value)]));
        let e = conn.recv_data(1, &mut Vec::new(), 4_999).unwrap_err();
        assert!(e.to_string().contains("larger than 4999"), "{e}");
        let mut conn = receiving(pdata(&[(5, true, &value)]));
        let e = conn.recv_data(1, &mut Vec::new(), usize::MAX).unwrap_err();
        assert!(e.to_string().contains("unexpected fragment"), "{e}");
    }
}
