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
            io: BufReader::with_capacity(64 * 1024, transport),
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
    pub(crate) fn read_value(&mut self, len: usize, dest: &mut Vec<u8>) -> Result<(), NetError> {
        let got = (&mut self.io).take(len as u64).read_to_end(dest)?;
        if got != len {
            return Err(NetError::Io(ErrorKind::UnexpectedEof.into()));
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
