//! `:authority` values that name a Unix socket path, made acceptable to the
//! agent's HTTP/2 server.
//!
//! Over a Unix socket, gRPC C-core (grpcio, hence py-spiffe) sends the
//! socket path, percent-encoded, as the `:authority` pseudo-header
//! (`tmp%2Fx%2Fapi.sock`); grpc-java sends it raw (`/tmp/x/api.sock`).
//! Neither is a valid authority, and h2 (under hyper and tonic) resets every
//! such stream with `PROTOCOL_ERROR` (hyperium/h2#487). h2, hyper and tonic
//! have no setting to relax that check. On the Workload API socket
//! `:authority` means nothing: the caller is identified by its peer
//! credentials and requests are routed by `:path`.
//!
//! So the agent reads the client's side of each connection through
//! [`AuthorityFix`]. It rewrites, in place, only the value of a `:authority`
//! field that holds a byte outside `A-Z a-z 0-9 - . _ ~ : [ ]`: every byte
//! of that value outside `A-Z a-z 0-9 - .` becomes `-`
//! (`tmp%2Fx%2Fapi.sock` → `tmp-2Fx-2Fapi.sock`). A value made of those
//! bytes only (`localhost`, `api.sock`, `[::1]:80`) is left alone.
//!
//! The rewrite keeps every length: the frame lengths stay valid, and both
//! ends of the connection keep HPACK dynamic-table entries (RFC 7541 §4)
//! of the same sizes, so the client's encoder and h2's decoder go on
//! agreeing on every index. To know which fields are `:authority`, the
//! adapter follows the dynamic table across the connection (which entry
//! names `:authority`, and each entry's size).
//!
//! What it guarantees:
//! - no byte outside a `:authority` value changes; no byte is added or
//!   dropped, and the order is kept;
//! - anything it does not fully understand (a connection that does not
//!   start with the HTTP/2 preface, a malformed header block, a frame out of
//!   place, a header block over [`MAX_HEADER_BLOCK`]) is passed on
//!   unchanged, and it stops rewriting for the rest of that connection: h2
//!   judges those bytes exactly as before;
//! - it holds back at most one header block (HEADERS and its CONTINUATION
//!   frames, at most [`MAX_HEADER_BLOCK`] bytes) until its END_HEADERS;
//!   every other byte passes through as it arrives;
//! - a Huffman-coded value is rewritten symbol by symbol into symbols of the
//!   same code length; when a symbol has no such replacement the value is
//!   left unchanged.
//!
//! It does not make an empty `:authority` acceptable (that cannot be done
//! at the same length); no known gRPC client sends one.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::LazyLock;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The most bytes of one header block (frame headers included) held back;
/// a larger block is passed on unchanged and rewriting stops. h2's own
/// limit on a header list (hyper's default, 16 KiB) is below this.
pub(super) const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// RFC 7541 §4.2 / RFC 9113 §6.5.2: the dynamic table starts at 4096 bytes;
/// only a dynamic table size update in a header block changes that.
const INITIAL_TABLE_SIZE: usize = 4096;
/// The largest table size update followed (h2 refuses any above the
/// `SETTINGS_HEADER_TABLE_SIZE` it announced, 4096 unless configured).
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// RFC 7541 §4.1: "The size of an entry is the sum of its name's length in
/// octets, its value's length in octets, and 32."
const ENTRY_OVERHEAD: usize = 32;
const AUTHORITY: &[u8] = b":authority";

/// The names of the HPACK static table (RFC 7541 Appendix A), index 1 first.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// Where the adapter is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// This many bytes of the preface seen.
    Preface(usize),
    /// Collecting a frame header.
    FrameHeader([u8; FRAME_HEADER_LEN], usize),
    /// Inside a frame's payload; `held` payloads belong to a header block.
    Payload { remaining: usize, held: bool },
    /// Everything passes unchanged from here on.
    Passthrough,
}

/// The client-to-server half of one Workload API connection, with
/// `:authority` values h2 would refuse rewritten (see the module docs).
/// Feed it what the socket gives ([`Self::push`], [`Self::finish`] at end
/// of stream) and hand h2 what [`Self::pending`] returns.
pub(super) struct AuthorityFix {
    state: State,
    table: Table,
    /// The frames (with their headers) of the header block being collected.
    block: Option<Vec<u8>>,
    /// Whether the frame being collected ends its header block.
    block_ends: bool,
    out: Vec<u8>,
    out_pos: usize,
    rewritten: usize,
}

impl std::fmt::Debug for AuthorityFix {
    // Header blocks may carry anything a client sends: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("state", &self.state)
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityFix {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityFix {
    /// At the start of a connection.
    pub(super) fn new() -> Self {
        Self {
            state: State::Preface(0),
            table: Table::new(),
            block: None,
            block_ends: false,
            out: Vec::new(),
            out_pos: 0,
            rewritten: 0,
        }
    }

    /// The bytes ready for the HTTP/2 server.
    pub(super) fn pending(&self) -> &[u8] {
        self.out.get(self.out_pos..).unwrap_or_default()
    }

    /// Marks `n` bytes of [`Self::pending`] as handed on.
    pub(super) fn consume(&mut self, n: usize) {
        self.out_pos = self.out_pos.saturating_add(n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// How many `:authority` values were rewritten so far.
    pub(super) fn rewritten(&self) -> usize {
        self.rewritten
    }

    /// The client closed its side: hand on whatever is held back, as is.
    pub(super) fn finish(&mut self) {
        // A frame header cut short by the end of the stream is held here,
        // not in `block`: hand it on too.
        let partial = match self.state {
            State::FrameHeader(hdr, have) => hdr.get(..have).unwrap_or_default().to_vec(),
            _ => Vec::new(),
        };
        self.give_up(&partial);
    }

    /// Bytes read from the client.
    pub(super) fn push(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    self.out.extend_from_slice(input);
                    return;
                }
                State::Preface(seen) => {
                    let want = PREFACE.get(seen..).unwrap_or_default();
                    let n = want.len().min(input.len());
                    let (head, rest) = input.split_at(n);
                    if want.get(..n) != Some(head) {
                        // Not HTTP/2 with prior knowledge: not ours to touch.
                        self.give_up(&[]);
                        continue;
                    }
                    self.out.extend_from_slice(head);
                    input = rest;
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameHeader([0; FRAME_HEADER_LEN], 0)
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::FrameHeader(mut hdr, have) => {
                    let n = (FRAME_HEADER_LEN - have).min(input.len());
                    let (head, rest) = input.split_at(n);
                    if let Some(dst) = hdr.get_mut(have..have + n) {
                        dst.copy_from_slice(head);
                    }
                    input = rest;
                    if have + n == FRAME_HEADER_LEN {
                        self.on_frame_header(hdr);
                    } else {
                        self.state = State::FrameHeader(hdr, have + n);
                    }
                }
                State::Payload { remaining, held } => {
                    let n = remaining.min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    match (&mut self.block, held) {
                        (Some(block), true) => block.extend_from_slice(chunk),
                        _ => self.out.extend_from_slice(chunk),
                    }
                    input = rest;
                    self.state = State::Payload {
                        remaining: remaining - n,
                        held,
                    };
                    if remaining == n {
                        self.payload_done(held);
                    }
                }
            }
        }
    }

    fn on_frame_header(&mut self, hdr: [u8; FRAME_HEADER_LEN]) {
        let [l0, l1, l2, kind, flags, ..] = hdr;
        let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        let held = match (&mut self.block, kind) {
            (Some(block), TYPE_CONTINUATION) => {
                if block.len() + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                    return self.give_up(&hdr);
                }
                block.extend_from_slice(&hdr);
                true
            }
            // Any other frame inside a header block is a protocol error
            // (RFC 9113 §6.10) for h2 to answer.
            (Some(_), _) => return self.give_up(&hdr),
            (None, TYPE_HEADERS) => {
                if FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                    return self.give_up(&hdr);
                }
                let mut block = Vec::with_capacity(FRAME_HEADER_LEN + len);
                block.extend_from_slice(&hdr);
                self.block = Some(block);
                true
            }
            // A header block we would not follow: the table is unknown after it.
            (None, TYPE_CONTINUATION | TYPE_PUSH_PROMISE) => return self.give_up(&hdr),
            (None, _) => {
                self.out.extend_from_slice(&hdr);
                false
            }
        };
        if held {
            self.block_ends = flags & FLAG_END_HEADERS != 0;
        }
        self.state = State::Payload {
            remaining: len,
            held,
        };
        if len == 0 {
            self.payload_done(held);
        }
    }

    fn payload_done(&mut self, held: bool) {
        self.state = State::FrameHeader([0; FRAME_HEADER_LEN], 0);
        if held && self.block_ends {
            self.finish_block();
        }
    }

    fn finish_block(&mut self) {
        let Some(mut block) = self.block.take() else {
            return;
        };
        match rewrite_block(&mut block, &mut self.table) {
            Ok(n) => {
                self.rewritten += n;
                self.out.extend_from_slice(&block);
            }
            Err(Malformed) => {
                // `block` is unchanged; h2 will judge it.
                self.block = Some(block);
                self.give_up(&[]);
            }
        }
    }

    /// Hands on what is held back and `extra`, unchanged, and passes
    /// everything through from now on.
    fn give_up(&mut self, extra: &[u8]) {
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block);
        }
        self.out.extend_from_slice(extra);
        self.state = State::Passthrough;
    }
}

/// Something in a header block this adapter does not follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed;

/// The header block fragments of a HEADERS frame and its CONTINUATION
/// frames, as ranges of `block`.
fn fragments(block: &[u8]) -> Result<Vec<Range<usize>>, Malformed> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < block.len() {
        let hdr = block.get(pos..pos + FRAME_HEADER_LEN).ok_or(Malformed)?;
        let [l0, l1, l2, kind, flags, ..] = *hdr else {
            return Err(Malformed);
        };
        let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        let start = pos + FRAME_HEADER_LEN;
        let end = start + len;
        if end > block.len() {
            return Err(Malformed);
        }
        let (mut from, mut to) = (start, end);
        if ranges.is_empty() {
            if kind != TYPE_HEADERS {
                return Err(Malformed);
            }
            if flags & FLAG_PADDED != 0 {
                let pad = usize::from(*block.get(from).ok_or(Malformed)?);
                from += 1;
                to = to.checked_sub(pad).ok_or(Malformed)?;
            }
            if flags & FLAG_PRIORITY != 0 {
                from += 5;
            }
            if from > to {
                return Err(Malformed);
            }
        } else if kind != TYPE_CONTINUATION {
            return Err(Malformed);
        }
        ranges.push(from..to);
        pos = end;
    }
    Ok(ranges)
}

/// Rewrites the `:authority` values in one header block (frames with their
/// headers) and follows the dynamic table through it. On `Err`, neither
/// `block` nor `table` has changed. Returns how many values it rewrote.
fn rewrite_block(block: &mut [u8], table: &mut Table) -> Result<usize, Malformed> {
    let ranges = fragments(block)?;
    let mut joined = Vec::with_capacity(block.len());
    for r in &ranges {
        joined.extend_from_slice(block.get(r.clone()).ok_or(Malformed)?);
    }
    let mut next = table.clone();
    let n = rewrite_fields(&mut joined, &mut next)?;
    let mut src = joined.as_slice();
    for r in ranges {
        let (part, rest) = src.split_at_checked(r.len()).ok_or(Malformed)?;
        block.get_mut(r).ok_or(Malformed)?.copy_from_slice(part);
        src = rest;
    }
    *table = next;
    Ok(n)
}

/// Walks the field representations of a header block (RFC 7541 §6).
fn rewrite_fields(buf: &mut [u8], table: &mut Table) -> Result<usize, Malformed> {
    let mut pos = 0;
    let mut rewritten = 0;
    let mut fields = false;
    while let Some(&first) = buf.get(pos) {
        if first & 0x80 != 0 {
            // §6.1 indexed field: no table change.
            let idx = integer(buf, &mut pos, 7)?;
            table.name(idx)?;
            fields = true;
            continue;
        }
        if first & 0xe0 == 0x20 {
            // §6.3 dynamic table size update, only before the first field
            // (§4.2; h2 refuses it elsewhere).
            let size = integer(buf, &mut pos, 5)?;
            if fields || size > MAX_TABLE_SIZE {
                return Err(Malformed);
            }
            table.resize(size);
            continue;
        }
        // §6.2: with incremental indexing (01), without (0000), never (0001).
        let (prefix, indexing) = if first & 0xc0 == 0x40 {
            (6, true)
        } else {
            (4, false)
        };
        fields = true;
        let name_idx = integer(buf, &mut pos, prefix)?;
        let (authority, name_len) = if name_idx == 0 {
            let name = string(buf, &mut pos)?;
            let name = name.decode(buf)?;
            (name == AUTHORITY, name.len())
        } else {
            table.name(name_idx)?
        };
        let value = string(buf, &mut pos)?;
        let value_len = if authority {
            let (len, changed) = rewrite_authority(buf, &value)?;
            rewritten += usize::from(changed);
            len
        } else {
            value.decoded_len(buf)?
        };
        if indexing {
            table.insert(Entry {
                authority,
                name_len,
                size: name_len + value_len + ENTRY_OVERHEAD,
            });
        }
    }
    Ok(rewritten)
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn integer(buf: &[u8], pos: &mut usize, prefix: u32) -> Result<usize, Malformed> {
    let mask = (1u8 << prefix) - 1;
    let first = buf.get(*pos).ok_or(Malformed)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(usize::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(Malformed)?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| Malformed);
        }
        shift += 7;
        // Four continuation bytes (28 bits) are far beyond any length here.
        if shift > 21 {
            return Err(Malformed);
        }
    }
}

/// A string literal (RFC 7541 §5.2): where its octets are.
struct Str {
    huffman: bool,
    range: Range<usize>,
}

fn string(buf: &[u8], pos: &mut usize) -> Result<Str, Malformed> {
    let huffman = buf.get(*pos).ok_or(Malformed)? & 0x80 != 0;
    let len = integer(buf, pos, 7)?;
    let end = pos.checked_add(len).ok_or(Malformed)?;
    if end > buf.len() {
        return Err(Malformed);
    }
    let range = *pos..end;
    *pos = end;
    Ok(Str { huffman, range })
}

impl Str {
    fn decode(&self, buf: &[u8]) -> Result<Vec<u8>, Malformed> {
        let raw = buf.get(self.range.clone()).ok_or(Malformed)?;
        if self.huffman {
            HUFFMAN.decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }

    fn decoded_len(&self, buf: &[u8]) -> Result<usize, Malformed> {
        if self.huffman {
            self.decode(buf).map(|d| d.len())
        } else {
            Ok(self.range.len())
        }
    }
}

/// Bytes h2 accepts in an authority in any case; a value of only these is
/// left alone.
fn tolerated(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']')
}

/// Bytes kept in a value that gets rewritten: a plain DNS-like name.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.')
}

/// Rewrites one `:authority` value in place if h2 would refuse it; returns
/// its decoded length and whether it changed.
fn rewrite_authority(buf: &mut [u8], value: &Str) -> Result<(usize, bool), Malformed> {
    let decoded = value.decode(buf)?;
    if decoded.iter().all(|&b| tolerated(b)) {
        return Ok((decoded.len(), false));
    }
    let dst = buf.get_mut(value.range.clone()).ok_or(Malformed)?;
    if !value.huffman {
        for b in dst.iter_mut().filter(|b| !plain(**b)) {
            *b = b'-';
        }
        return Ok((decoded.len(), true));
    }
    // Same code length per symbol: same number of bits, so the same octets
    // once padded.
    let mut replaced = Vec::with_capacity(decoded.len());
    for &b in &decoded {
        if plain(b) {
            replaced.push(b);
        } else {
            match HUFFMAN.plain_of_length(b) {
                Some(r) => replaced.push(r),
                None => return Ok((decoded.len(), false)),
            }
        }
    }
    let encoded = HUFFMAN.encode(&replaced);
    if encoded.len() != dst.len() {
        return Ok((decoded.len(), false));
    }
    dst.copy_from_slice(&encoded);
    Ok((decoded.len(), true))
}

/// What the adapter needs of a dynamic table entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// The HPACK dynamic table as the decoder (h2) keeps it: the newest entry
/// first, evicted from the oldest (RFC 7541 §4).
#[derive(Debug, Clone)]
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: INITIAL_TABLE_SIZE,
        }
    }

    fn evict_for(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict_for(0);
    }

    /// §4.4: an entry larger than the table empties it and is not added.
    fn insert(&mut self, e: Entry) {
        if e.size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_for(e.size);
        self.size += e.size;
        self.entries.push_front(e);
    }

    /// Whether index `idx` (static, then dynamic; §2.3.3) names
    /// `:authority`, and its name's length.
    fn name(&self, idx: usize) -> Result<(bool, usize), Malformed> {
        if idx == 0 {
            return Err(Malformed);
        }
        if let Some(name) = STATIC_NAMES.get(idx - 1) {
            return Ok((idx == 1, name.len()));
        }
        self.entries
            .get(idx - 1 - STATIC_NAMES.len())
            .map(|e| (e.authority, e.name_len))
            .ok_or(Malformed)
    }
}

/// The HPACK Huffman code (RFC 7541 Appendix B): the code length of every
/// symbol, 0–255 then EOS (256). The code is canonical, so the lengths
/// determine the codes.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];
const MAX_CODE_LEN: usize = 30;
const EOS: u16 = 256;

/// A canonical Huffman coder built from [`CODE_LENGTHS`].
struct Huffman {
    codes: [u32; 257],
    /// Per code length: the first code, where its symbols start in
    /// `sorted`, and how many there are.
    first_code: [u32; MAX_CODE_LEN + 1],
    first_index: [usize; MAX_CODE_LEN + 1],
    count: [usize; MAX_CODE_LEN + 1],
    /// Symbols ordered by (code length, symbol).
    sorted: Vec<u16>,
    /// Per code length, a plain byte (see [`plain`]) with that length.
    plain_by_len: [Option<u8>; MAX_CODE_LEN + 1],
}

static HUFFMAN: LazyLock<Huffman> = LazyLock::new(Huffman::build);

impl Huffman {
    fn len_of(sym: u16) -> usize {
        CODE_LENGTHS
            .get(usize::from(sym))
            .map_or(MAX_CODE_LEN, |&l| usize::from(l))
    }

    fn build() -> Self {
        let mut sorted: Vec<u16> = (0..=EOS).collect();
        sorted.sort_by_key(|&s| (Self::len_of(s), s));
        let mut h = Self {
            codes: [0; 257],
            first_code: [0; MAX_CODE_LEN + 1],
            first_index: [0; MAX_CODE_LEN + 1],
            count: [0; MAX_CODE_LEN + 1],
            sorted,
            plain_by_len: [None; MAX_CODE_LEN + 1],
        };
        let mut code: u32 = 0;
        let mut prev_len = 0;
        for (i, &sym) in h.sorted.iter().enumerate() {
            let len = Self::len_of(sym);
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            if let Some(c) = h.codes.get_mut(usize::from(sym)) {
                *c = code;
            }
            if h.count.get(len) == Some(&0) {
                h.first_code[len] = code;
                h.first_index[len] = i;
            }
            if let Some(n) = h.count.get_mut(len) {
                *n += 1;
            }
        }
        for &b in b"-.0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" {
            if let Some(slot) = h.plain_by_len.get_mut(Self::len_of(u16::from(b)))
                && slot.is_none()
            {
                *slot = Some(b);
            }
        }
        h
    }

    /// A plain byte whose code is as long as `b`'s, if there is one.
    fn plain_of_length(&self, b: u8) -> Option<u8> {
        self.plain_by_len
            .get(Self::len_of(u16::from(b)))
            .copied()
            .flatten()
    }

    /// Decodes a Huffman string; refuses EOS inside it and padding that is
    /// longer than 7 bits or not all ones (§5.2).
    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
        let (mut code, mut len) = (0u32, 0usize);
        for &byte in bytes {
            for bit in (0..8).rev() {
                code = code << 1 | u32::from(byte >> bit & 1);
                len += 1;
                if len > MAX_CODE_LEN {
                    return Err(Malformed);
                }
                let offset = code.wrapping_sub(self.first_code[len]) as usize;
                if code >= self.first_code[len] && offset < self.count[len] {
                    let sym = *self
                        .sorted
                        .get(self.first_index[len] + offset)
                        .ok_or(Malformed)?;
                    let sym = u8::try_from(sym).map_err(|_| Malformed)?; // EOS
                    out.push(sym);
                    (code, len) = (0, 0);
                }
            }
        }
        if len > 7 || code != (1u32 << len) - 1 {
            return Err(Malformed);
        }
        Ok(out)
    }

    fn encode(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        let (mut acc, mut bits) = (0u64, 0usize);
        for &b in bytes {
            let len = Self::len_of(u16::from(b));
            acc = acc << len | u64::from(self.codes[usize::from(b)]);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            // Pad with the most significant bits of EOS: all ones.
            out.push((acc << (8 - bits) | (0xff >> bits)) as u8);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything grpcio 1.85.3 (py-spiffe 0.3.2, `FetchJWTSVID`) sent on a
    /// connection to `unix:///tmp/t6py/api.sock`, captured: preface,
    /// SETTINGS, WINDOW_UPDATE, HEADERS (with `:authority:
    /// tmp%2Ft6py%2Fapi.sock`, a literal with incremental indexing), DATA.
    const GRPCIO_CAPTURE: &[&str] = &[
        "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a000024040000000000000200000000000300000000000400",
        "400000000500400000000600004000fe0300000001000004080000000000003f00010000000401000000000000fb0104",
        "0000000140053a706174681f2f537069666665576f726b6c6f61644150492f46657463684a575453564944400a3a6175",
        "74686f7269747915746d70253246743670792532466170692e736f636b8386400c636f6e74656e742d74797065106170",
        "706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e",
        "67176964656e746974792c206465666c6174652c20677a6970400a757365722d6167656e7430677270632d707974686f",
        "6e2f312e38352e3320677270632d632f35382e302e3020286c696e75783b20636874747032290012776f726b6c6f6164",
        "2e7370696666652e696f04747275650000040800000000010000000500000800010000000100000000030a0178000004",
        "08000000000000000005",
    ];

    fn grpcio_capture() -> Vec<u8> {
        let hex: String = GRPCIO_CAPTURE.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn int(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
        let mask = (1usize << prefix) - 1;
        if n < mask {
            out.push(first | n as u8);
            return;
        }
        out.push(first | mask as u8);
        n -= mask;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }

    fn str_raw(out: &mut Vec<u8>, s: &[u8]) {
        int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }

    fn str_huff(out: &mut Vec<u8>, s: &[u8]) {
        let enc = HUFFMAN.encode(s);
        int(out, 0x80, 7, enc.len());
        out.extend_from_slice(&enc);
    }

    fn lit_new_name(out: &mut Vec<u8>, indexing: bool, name: &str, value: &[u8]) {
        out.push(if indexing { 0x40 } else { 0x00 });
        str_raw(out, name.as_bytes());
        str_raw(out, value);
    }

    fn lit_indexed_name(out: &mut Vec<u8>, indexing: bool, idx: usize, value: &[u8]) {
        if indexing {
            int(out, 0x40, 6, idx);
        } else {
            int(out, 0x00, 4, idx);
        }
        str_raw(out, value);
    }

    fn run(input: &[u8]) -> (Vec<u8>, usize) {
        let mut f = AuthorityFix::new();
        f.push(input);
        f.finish();
        (f.pending().to_vec(), f.rewritten())
    }

    fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let i = hay
            .windows(from.len())
            .position(|w| w == from)
            .expect("present");
        let mut v = hay.to_vec();
        v[i..i + from.len()].copy_from_slice(to);
        v
    }

    fn connection(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            v.extend_from_slice(&frame(TYPE_HEADERS, FLAG_END_HEADERS, 2 * i as u32 + 1, b));
            v.extend_from_slice(&frame(0x0, 0x1, 2 * i as u32 + 1, b"\0\0\0\0\0"));
        }
        v
    }

    #[test]
    fn huffman_matches_rfc_7541() {
        // C.4.1: "www.example.com".
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(HUFFMAN.decode(&www).unwrap(), b"www.example.com");
        assert_eq!(HUFFMAN.encode(b"www.example.com"), www);
        // C.4.2: "no-cache"; C.6.1: "Mon, 21 Oct 2013 20:13:21 GMT".
        assert_eq!(
            HUFFMAN.encode(b"no-cache"),
            [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]
        );
        let date = [
            0xd0, 0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04, 0x0b,
            0x81, 0x66, 0xe0, 0x82, 0xa6, 0x2d, 0x1b, 0xff,
        ];
        assert_eq!(
            HUFFMAN.decode(&date).unwrap(),
            b"Mon, 21 Oct 2013 20:13:21 GMT"
        );
        // Appendix B spot checks, and EOS is 30 ones.
        assert_eq!(
            (HUFFMAN.codes[usize::from(b'%')], CODE_LENGTHS[37]),
            (0x15, 6)
        );
        assert_eq!(HUFFMAN.codes[usize::from(b'-')], 0x16);
        assert_eq!(HUFFMAN.codes[0], 0x1ff8);
        assert_eq!(HUFFMAN.codes[255], 0x3ffffee);
        assert_eq!(HUFFMAN.codes[256], 0x3fff_ffff);
        // Every byte round-trips.
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(HUFFMAN.decode(&HUFFMAN.encode(&all)).unwrap(), all);
        // Padding of 8 bits, padding not all ones, EOS inside: refused.
        assert!(HUFFMAN.decode(&[0xf1, 0xe3, 0xff]).is_err());
        assert!(HUFFMAN.decode(&[0x00]).is_err());
        assert!(HUFFMAN.decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn static_table_names() {
        assert_eq!(STATIC_NAMES[0], ":authority");
        assert_eq!(STATIC_NAMES[3], ":path");
        assert_eq!(STATIC_NAMES[13], ":status");
        assert_eq!(STATIC_NAMES[30], "content-type");
        assert_eq!(STATIC_NAMES[37], "host");
        assert_eq!(STATIC_NAMES[60], "www-authenticate");
    }

    #[test]
    fn rewrites_grpcio_socket_path_authority_only() {
        let input = grpcio_capture();
        let (out, n) = run(&input);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            replace(&input, b"tmp%2Ft6py%2Fapi.sock", b"tmp-2Ft6py-2Fapi.sock")
        );
    }

    #[test]
    fn same_output_however_the_reads_split() {
        let mut input = grpcio_capture();
        // A second request on the connection, reusing the dynamic entries.
        // 62 workload.spiffe.io … 67 :authority, 68 :path.
        let mut block = vec![0x80 | 68, 0x80 | 67, 0x83, 0x86];
        block.extend_from_slice(&[0x80 | 66, 0x80 | 65, 0x80 | 62]);
        input.extend_from_slice(&frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block));
        input.extend_from_slice(&frame(0x0, 0x1, 3, &[0, 0, 0, 0, 0]));
        let (whole, _) = run(&input);
        for cut in 0..input.len() {
            for cut2 in [cut, (cut + 7).min(input.len())] {
                let mut f = AuthorityFix::new();
                f.push(&input[..cut]);
                f.push(&input[cut..cut2]);
                f.push(&input[cut2..]);
                assert_eq!(f.pending(), whole.as_slice(), "cut at {cut}/{cut2}");
            }
        }
        // One byte at a time, handing bytes on as they come.
        let mut f = AuthorityFix::new();
        let mut got = vec![];
        for b in &input {
            f.push(std::slice::from_ref(b));
            got.extend_from_slice(f.pending());
            let n = f.pending().len();
            f.consume(n);
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn leaves_valid_authorities_and_other_headers_alone() {
        for value in [&b"localhost"[..], b"api.sock", b"[::1]:50051", b"a_b~c"] {
            let mut block = vec![];
            lit_new_name(&mut block, true, ":authority", value);
            lit_new_name(&mut block, false, "x-path", b"/tmp/a%2Fb");
            lit_indexed_name(&mut block, false, 4, b"/Svc/Method");
            let input = connection(&[block]);
            assert_eq!(run(&input), (input.clone(), 0));
        }
    }

    #[test]
    fn rewrites_raw_paths_and_every_representation() {
        // grpc-java style raw path, via the static name (index 1), without
        // indexing and never indexed.
        for first in [0x00, 0x10, 0x40] {
            let mut block = vec![first | 1];
            str_raw(&mut block, b"/var/run/x y@z.sock");
            let input = connection(&[block]);
            let (out, n) = run(&input);
            assert_eq!(n, 1);
            assert_eq!(
                out,
                replace(&input, b"/var/run/x y@z.sock", b"-var-run-x-y-z.sock")
            );
        }
    }

    #[test]
    fn follows_the_dynamic_table() {
        // Block 1: `:authority` (bad) added at 62; block 2: a literal with
        // the dynamic name 62 (rewritten), and `x-a` pushed in front.
        let mut b1 = vec![];
        lit_new_name(&mut b1, true, ":authority", b"tmp%2Fa");
        let mut b2 = vec![];
        lit_new_name(&mut b2, true, "x-a", b"tmp%2Fb");
        lit_indexed_name(&mut b2, false, 63, b"tmp%2Fc");
        // Block 3: index 62 is now `x-a`: its value is not touched.
        let mut b3 = vec![];
        lit_indexed_name(&mut b3, false, 62, b"tmp%2Fd");
        let input = connection(&[b1, b2, b3]);
        let (out, n) = run(&input);
        assert_eq!(n, 2);
        let want = replace(&input, b"tmp%2Fa", b"tmp-2Fa");
        let want = replace(&want, b"tmp%2Fc", b"tmp-2Fc");
        assert_eq!(out, want);
    }

    #[test]
    fn follows_evictions_and_size_updates() {
        // `:authority` at 62, then enough entries to evict it (4096 bytes):
        // 62 then names a non-authority entry.
        let mut b1 = vec![];
        lit_new_name(&mut b1, true, ":authority", b"tmp%2Fa");
        let big = vec![b'v'; 1000];
        for _ in 0..4 {
            lit_new_name(&mut b1, true, "x-big", &big);
        }
        let mut b2 = vec![];
        lit_indexed_name(&mut b2, false, 66, b"tmp%2Fb"); // evicted: no such entry
        let input = connection(&[b1.clone(), b2]);
        let (out, n) = run(&input);
        // 66 does not exist any more: block 2 is malformed to us and h2.
        assert_eq!(n, 1);
        assert_eq!(out, replace(&input, b"tmp%2Fa", b"tmp-2Fa"));

        // A size update to 0 empties the table; a later 62 is unknown.
        let mut b2 = vec![0x20];
        lit_indexed_name(&mut b2, false, 1, b"tmp%2Fb");
        let mut b3 = vec![];
        lit_indexed_name(&mut b3, false, 62, b"tmp%2Fc");
        let mut b1 = vec![];
        lit_new_name(&mut b1, true, ":authority", b"tmp%2Fa");
        let input = connection(&[b1, b2, b3]);
        let (out, n) = run(&input);
        assert_eq!(n, 2);
        let want = replace(&input, b"tmp%2Fa", b"tmp-2Fa");
        assert_eq!(out, replace(&want, b"tmp%2Fb", b"tmp-2Fb"));
    }

    #[test]
    fn rewrites_huffman_values_at_the_same_length() {
        let mut block = vec![0x41];
        str_huff(&mut block, b"tmp%2Fx%2Fapi.sock");
        lit_new_name(&mut block, false, "x-after", b"%");
        let input = connection(&[block.clone()]);
        let (out, n) = run(&input);
        assert_eq!(n, 1);
        let enc = HUFFMAN.encode(b"tmp%2Fx%2Fapi.sock");
        let fixed = HUFFMAN.encode(b"tmp-2Fx-2Fapi.sock");
        assert_eq!(out, replace(&input, &enc, &fixed));

        // '!' (10 bits) has no plain byte of its length: left as it is.
        let mut block = vec![0x41];
        str_huff(&mut block, b"a!b");
        let input = connection(&[block]);
        assert_eq!(run(&input), (input.clone(), 0));
        // A Huffman-coded name `:authority` counts too.
        let mut block = vec![0x40];
        str_huff(&mut block, b":authority");
        str_raw(&mut block, b"/x");
        let input = connection(&[block]);
        assert_eq!(run(&input).0, replace(&input, b"/x", b"-x"));
    }

    #[test]
    fn padding_priority_and_continuation() {
        let mut fragment = vec![];
        lit_new_name(&mut fragment, true, ":authority", b"tmp%2Fsplit%2Fapi.sock");
        lit_new_name(&mut fragment, true, "te", b"trailers");
        // HEADERS (padded, with priority) carries the first 20 bytes; the
        // value straddles into the CONTINUATION.
        let (a, b) = fragment.split_at(20);
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            1,
            &payload,
        ));
        input.extend_from_slice(&frame(TYPE_CONTINUATION, 0, 1, &[]));
        input.extend_from_slice(&frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        let (out, n) = run(&input);
        assert_eq!(n, 1);
        let mut want = fragment.clone();
        let i = want.windows(3).position(|w| w == b"%2F").unwrap();
        want[i] = b'-';
        let j = want.windows(3).position(|w| w == b"%2F").unwrap();
        want[j] = b'-';
        let (wa, wb) = want.split_at(20);
        assert_eq!(&out[24 + 9 + 6..24 + 9 + 6 + 20], wa);
        assert_eq!(&out[out.len() - wb.len()..], wb);
        assert_eq!(out.len(), input.len());
    }

    #[test]
    fn gives_up_unchanged_on_anything_odd() {
        let mut bad_path = vec![];
        lit_new_name(&mut bad_path, true, ":authority", b"tmp%2Fa");
        let later = connection(&[bad_path.clone()])[PREFACE.len()..].to_vec();
        let odd: Vec<Vec<u8>> = vec![
            vec![0x80],                               // index 0
            vec![0x80 | 70],                          // index beyond both tables
            vec![0x40 | 63, 0x01, b'x'],              // a dynamic name that does not exist
            vec![0x3f, 0xe1, 0xff, 0x07],             // size update to 128 KiB, over the cap
            vec![0x82, 0x20],                         // size update after a field
            vec![0x04, 0x05, b'x'],                   // string longer than the block
            vec![0x1f, 0xff, 0xff, 0xff, 0xff, 0x7f], // oversized integer
            vec![0x41, 0x81, 0x00],                   // bad Huffman padding
        ];
        for block in odd {
            // After a block it cannot follow, nothing more is rewritten.
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
            input.extend_from_slice(&later);
            assert_eq!(run(&input), (input.clone(), 0), "{block:x?}");
        }

        // Not HTTP/2 prior knowledge.
        let http1 = b"GET / HTTP/1.1\r\nHost: tmp%2Fa\r\n\r\n".to_vec();
        assert_eq!(run(&http1), (http1.clone(), 0));

        // A DATA frame between HEADERS and its CONTINUATION; a CONTINUATION
        // or PUSH_PROMISE out of place.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(TYPE_HEADERS, 0, 1, &bad_path));
        input.extend_from_slice(&frame(0x0, 0, 1, b"x"));
        input.extend_from_slice(&later);
        assert_eq!(run(&input), (input.clone(), 0));
        for kind in [TYPE_CONTINUATION, TYPE_PUSH_PROMISE] {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&frame(kind, FLAG_END_HEADERS, 1, &bad_path));
            input.extend_from_slice(&later);
            assert_eq!(run(&input), (input.clone(), 0));
        }

        // Padding longer than the frame.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &[200, 0x82],
        ));
        input.extend_from_slice(&later);
        assert_eq!(run(&input), (input.clone(), 0));
    }

    #[test]
    fn oversized_header_blocks_are_not_held() {
        let mut block = vec![];
        lit_new_name(&mut block, true, ":authority", b"tmp%2Fa");
        lit_new_name(&mut block, false, "x-big", &vec![b'v'; 20_000]);
        let mut input = PREFACE.to_vec();
        // 3 × 20 KB in CONTINUATION frames: over the cap, passed on as is.
        input.extend_from_slice(&frame(TYPE_HEADERS, 0, 1, &block));
        input.extend_from_slice(&frame(TYPE_CONTINUATION, 0, 1, &vec![0x82; 20_000]));
        input.extend_from_slice(&frame(TYPE_CONTINUATION, 0, 1, &vec![0x82; 30_000]));
        let mut f = AuthorityFix::new();
        f.push(&input);
        // Nothing is held back even without END_HEADERS or end of stream.
        assert_eq!(f.pending(), input.as_slice());
        assert_eq!(f.rewritten(), 0);
    }

    #[test]
    fn end_of_stream_hands_on_a_partial_block() {
        let input = grpcio_capture();
        let cut = input.windows(3).position(|w| w == b"tmp").unwrap();
        let mut f = AuthorityFix::new();
        f.push(&input[..cut]);
        assert!(f.pending().len() < cut, "the partial block is held");
        f.finish();
        assert_eq!(f.pending(), &input[..cut]);
    }

    #[test]
    fn debug_shows_no_header_bytes() {
        let mut f = AuthorityFix::new();
        f.push(&grpcio_capture()[..200]);
        let d = format!("{f:?}");
        assert!(!d.contains("tmp") && !d.contains("Spiffe"), "{d}");
    }

    /// Hostile input, generated: random mutations of a real connection
    /// (flipped, inserted and deleted bytes, truncation) and random bytes
    /// after the preface, pushed in random splits. Whatever comes in, the
    /// adapter never panics, hands on exactly as many bytes as it got, and
    /// changes nothing but bytes it turns into `-`.
    #[test]
    fn hostile_streams_keep_their_length_and_only_gain_dashes() {
        let mut seed: u64 = 0x5161_1c0d_e5ee_d001;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let capture = grpcio_capture();
        for round in 0..20_000 {
            let mut input = if round % 4 == 0 {
                let mut v = PREFACE.to_vec();
                let n = (next() % 600) as usize;
                v.extend((0..n).map(|_| next() as u8));
                v
            } else {
                capture.clone()
            };
            for _ in 0..(next() % 6) {
                if input.is_empty() {
                    break;
                }
                let at = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[at] ^= 1 << (next() % 8),
                    1 => input[at] = next() as u8,
                    2 => input.insert(at, next() as u8),
                    _ => {
                        input.remove(at);
                    }
                }
            }
            if next() % 5 == 0 {
                let keep = (next() as usize) % (input.len() + 1);
                input.truncate(keep);
            }
            let mut f = AuthorityFix::new();
            let mut out = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let n = 1 + (next() as usize) % rest.len().min(97);
                let (now, later) = rest.split_at(n);
                f.push(now);
                out.extend_from_slice(f.pending());
                let k = f.pending().len();
                f.consume(k);
                rest = later;
            }
            f.finish();
            out.extend_from_slice(f.pending());
            assert_eq!(out.len(), input.len(), "round {round}");
            for (a, b) in input.iter().zip(&out) {
                assert!(a == b || *b == b'-', "round {round}: {a:#x} became {b:#x}");
            }
        }
    }
}
