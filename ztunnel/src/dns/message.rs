//! The wire side of one exchange, on bytes and without sockets: reading a pod's query,
//! and writing our answer, an error, or the upstream's reply back within the size the
//! client can take (EDNS payload size over UDP; TC set, records dropped, past it).

use super::resolve::Family;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::IpAddr;

/// Largest UDP reply we send, whatever the client advertises (as common resolvers).
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// The payload size we advertise in our own OPT record (the DNS flag day's value).
pub const OUR_UDP_PAYLOAD: u16 = 1232;

/// How the query reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// A query we will answer or forward.
#[derive(Debug)]
pub struct Request {
    msg: Message,
    /// The query as the pod sent it (forwarded with its flags and EDNS, under our own ID).
    raw: Vec<u8>,
    transport: Transport,
}

/// Why a message is not a query we serve; `Some` bytes are the reply to send anyway.
#[derive(Debug)]
pub struct Rejected(pub Option<Vec<u8>>);

impl Request {
    /// Reads a pod's message. Responses and garbage without a readable header are dropped
    /// (never answered: no reflection); malformed queries get FORMERR, other opcodes
    /// NOTIMP, EDNS versions other than 0 BADVERS.
    pub fn parse(bytes: &[u8], transport: Transport) -> Result<Request, Rejected> {
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => return Err(Rejected(format_error(bytes))),
        };
        if msg.metadata.message_type != MessageType::Query {
            return Err(Rejected(None));
        }
        let req = Request {
            msg,
            raw: bytes.to_vec(),
            transport,
        };
        if req.msg.metadata.op_code != OpCode::Query {
            return Err(Rejected(req.error(ResponseCode::NotImp).ok()));
        }
        if req.msg.queries.len() != 1 {
            return Err(Rejected(req.error(ResponseCode::FormErr).ok()));
        }
        if req.msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Err(Rejected(req.error(ResponseCode::BADVERS).ok()));
        }
        Ok(req)
    }

    fn query(&self) -> &Query {
        &self.msg.queries[0]
    }

    /// The query to send upstream: the pod's bytes under `id`, a fresh random ID of ours
    /// (the pod's own may be predictable, and it is the only secret an off-path spoofer
    /// has to guess besides the port; RFC 5452 §9.2).
    pub fn upstream_query(&self, id: u16) -> Vec<u8> {
        let mut q = self.raw.clone();
        q[..2].copy_from_slice(&id.to_be_bytes());
        q
    }

    /// Whether `bytes` is the reply to [`Request::upstream_query`]`(id)`: a response with
    /// that ID and the same question (the name compared without case, RFC 4343).
    pub fn is_reply(&self, id: u16, bytes: &[u8]) -> bool {
        if response_id(bytes) != Some(id) {
            return false;
        }
        let Ok(m) = Message::from_vec(bytes) else {
            return false;
        };
        m.queries.len() == 1
            && m.queries[0].query_type() == self.query().query_type()
            && m.queries[0].query_class() == self.query().query_class()
            && m.queries[0].name().to_lowercase() == self.query().name().to_lowercase()
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn name(&self) -> String {
        self.query().name().to_ascii()
    }

    pub fn record_type(&self) -> RecordType {
        self.query().query_type()
    }

    /// `A` or `AAAA`, the types we may answer ourselves.
    pub fn family(&self) -> Option<Family> {
        match self.record_type() {
            RecordType::A => Some(Family::V4),
            RecordType::AAAA => Some(Family::V6),
            _ => None,
        }
    }

    /// The query type as a metric label: known types by name, the rest as `other` (a
    /// pod's bytes never become new label values beyond these).
    pub fn type_label(&self) -> &'static str {
        match self.record_type() {
            RecordType::A => "a",
            RecordType::AAAA => "aaaa",
            RecordType::CNAME => "cname",
            RecordType::MX => "mx",
            RecordType::NS => "ns",
            RecordType::PTR => "ptr",
            RecordType::SOA => "soa",
            RecordType::SRV => "srv",
            RecordType::TXT => "txt",
            RecordType::HTTPS => "https",
            RecordType::SVCB => "svcb",
            RecordType::ANY => "any",
            _ => "other",
        }
    }

    /// Largest reply the client takes: its EDNS payload size over UDP (512 without EDNS,
    /// at most [`MAX_UDP_PAYLOAD`]), the TCP frame limit otherwise.
    pub fn max_reply(&self) -> usize {
        match self.transport {
            Transport::Tcp => u16::MAX as usize,
            Transport::Udp => self.msg.max_payload().min(MAX_UDP_PAYLOAD) as usize,
        }
    }

    fn reply(&self) -> Message {
        let mut m = Message::response(self.msg.metadata.id, OpCode::Query);
        m.metadata = Metadata::response_from_request(&self.msg.metadata);
        m.metadata.recursion_available = true;
        m.add_query(self.query().clone());
        if self.msg.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_UDP_PAYLOAD);
            m.set_edns(edns);
        }
        m
    }

    /// An error reply (no records).
    pub fn error(&self, code: ResponseCode) -> Result<Vec<u8>, String> {
        let mut m = self.reply();
        m.metadata.response_code = code;
        if code.high() != 0 && m.edns.is_none() {
            // Extended codes travel in the OPT record.
            m.set_edns(Edns::new());
        }
        if let Some(e) = m.edns.as_mut() {
            e.set_rcode_high(code.high());
        }
        encode(&m, self.max_reply(), self.transport)
    }

    /// Our authoritative answer: `addrs` (none: NODATA) for the question's name, or after
    /// `question CNAME cname` for `cname`, every record with `ttl` seconds.
    pub fn answer(
        &self,
        cname: Option<&str>,
        addrs: &[IpAddr],
        ttl: u32,
    ) -> Result<Vec<u8>, String> {
        let mut m = self.reply();
        m.metadata.authoritative = true;
        let requested = self.query().name().clone();
        let owner = match cname {
            Some(c) => {
                let target = Name::from_ascii(format!("{c}."))
                    .map_err(|e| format!("CNAME target {c:?}: {e}"))?;
                m.add_answer(Record::from_rdata(
                    requested,
                    ttl,
                    RData::CNAME(CNAME(target.clone())),
                ));
                target
            }
            None => requested,
        };
        for ip in addrs {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            };
            m.add_answer(Record::from_rdata(owner.clone(), ttl, rdata));
        }
        encode(&m, self.max_reply(), self.transport)
    }

    /// The upstream's reply to [`Request::upstream_query`]`(id)`, checked to be one
    /// ([`Request::is_reply`]), under the pod's ID again and cut to what the client takes.
    /// `Err` when it is no reply to us.
    pub fn relay(&self, id: u16, upstream: &[u8]) -> Result<Vec<u8>, String> {
        if !self.is_reply(id, upstream) {
            return Err("the upstream's reply does not match the query".into());
        }
        let pod_id = self.msg.metadata.id;
        if upstream.len() <= self.max_reply() {
            let mut reply = upstream.to_vec();
            reply[..2].copy_from_slice(&pod_id.to_be_bytes());
            return Ok(reply);
        }
        let mut m =
            Message::from_vec(upstream).map_err(|e| format!("unreadable upstream reply: {e}"))?;
        m.metadata.id = pod_id;
        encode(&m, self.max_reply(), self.transport)
    }
}

/// The ID of a response (QR set) from its header, even if the rest is cut short.
pub fn response_id(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 12 && bytes[2] & 0x80 != 0).then(|| u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// `m` encoded within `max` bytes. When longer: without its authority and additional
/// records, then with as many answers as fit (dropped from the end: a shuffled endpoint
/// list stays a fair sample, a CNAME stays first). Over UDP TC is set then, so the client
/// may ask again over TCP for the rest; over TCP there is no bigger frame to ask for.
fn encode(m: &Message, max: usize, transport: Transport) -> Result<Vec<u8>, String> {
    let bytes = to_vec(m)?;
    if fits(&bytes, m, max) {
        return Ok(bytes);
    }
    let mut t = m.clone();
    t.metadata.message_type = MessageType::Response;
    t.metadata.truncation = transport == Transport::Udp;
    t.authorities.clear();
    t.additionals.clear();
    t.signature = None;
    let answers = std::mem::take(&mut t.answers);
    // The largest count that fits (0 always does: header, question and OPT only).
    let (mut kept, mut too_many) = (0, answers.len() + 1);
    let mut best = to_vec(&t)?;
    while too_many - kept > 1 {
        let mid = (kept + too_many) / 2;
        t.answers = answers[..mid].to_vec();
        let b = to_vec(&t)?;
        if fits(&b, &t, max) {
            (kept, best) = (mid, b);
        } else {
            too_many = mid;
        }
    }
    Ok(best)
}

/// Whether `bytes`, `m` encoded, is within `max` and whole: the encoder itself stops at
/// 64 KiB and sets TC, which `m` did not ask for.
fn fits(bytes: &[u8], m: &Message, max: usize) -> bool {
    let tc = bytes.get(2).is_some_and(|b| b & 0x02 != 0);
    bytes.len() <= max && tc == m.metadata.truncation
}

fn to_vec(m: &Message) -> Result<Vec<u8>, String> {
    m.to_vec().map_err(|e| format!("cannot encode reply: {e}"))
}

/// FORMERR for a query we cannot read, if at least its header says it is a query.
fn format_error(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn read(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    fn v4s(n: u8) -> Vec<IpAddr> {
        (0..n).map(|i| IpAddr::from([10, 96, 0, i])).collect()
    }

    #[test]
    fn answer_carries_the_question_and_records_authoritatively() {
        let req = Request::parse(&query("echo.ns1.", RecordType::A, None), Transport::Udp).unwrap();
        let r = read(&req.answer(None, &v4s(2), 30).unwrap());
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert!(r.metadata.authoritative && r.metadata.recursion_desired);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.queries[0].name().to_ascii(), "echo.ns1.");
        assert_eq!(r.answers.len(), 2);
        assert_eq!(r.answers[0].ttl, 30);
        assert_eq!(r.answers[0].name.to_ascii(), "echo.ns1.");
        assert!(r.edns.is_none(), "no OPT record unless the client sent one");
    }

    #[test]
    fn cname_then_records_of_its_target() {
        let req = Request::parse(
            &query("echo.ns1.ns1.svc.cluster.local.", RecordType::A, Some(1232)),
            Transport::Udp,
        )
        .unwrap();
        let r = read(&req.answer(Some("echo.ns1"), &v4s(1), 5).unwrap());
        assert_eq!(r.answers.len(), 2);
        assert!(r.answers.iter().all(|a| a.ttl == 5), "the TTL given");
        assert_eq!(r.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(r.answers[1].name.to_ascii(), "echo.ns1.");
        assert_eq!(r.edns.as_ref().unwrap().max_payload(), OUR_UDP_PAYLOAD);
    }

    #[test]
    fn nodata_is_noerror_without_records() {
        let req =
            Request::parse(&query("v4only.", RecordType::AAAA, None), Transport::Udp).unwrap();
        let r = read(&req.answer(None, &[], 30).unwrap());
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn too_large_for_udp_keeps_what_fits_with_tc_and_is_whole_over_tcp_or_with_edns() {
        let bytes = query("big.", RecordType::A, None);
        let udp = Request::parse(&bytes, Transport::Udp).unwrap();
        assert_eq!(udp.max_reply(), 512);
        let addrs = v4s(40);
        let r = udp.answer(None, &addrs, 30).unwrap(); // 40 × 16 bytes > 512
        assert!(r.len() <= 512);
        let r = read(&r);
        assert!(r.metadata.truncation, "TC set");
        // 12 header + 9 question + n × 16 (name pointer, type, class, TTL, length, IP).
        assert_eq!(r.answers.len(), 30, "as many as fit");
        let got: Vec<RData> = r.answers.iter().map(|a| a.data.clone()).collect();
        let first: Vec<RData> = addrs[..30]
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, first, "the first ones, in order");
        let tcp = Request::parse(&bytes, Transport::Tcp).unwrap();
        let r = read(&tcp.answer(None, &addrs, 30).unwrap());
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 40);
        let edns =
            Request::parse(&query("big.", RecordType::A, Some(4096)), Transport::Udp).unwrap();
        assert_eq!(
            read(&edns.answer(None, &addrs, 30).unwrap()).answers.len(),
            40
        );
        let huge =
            Request::parse(&query("big.", RecordType::A, Some(65000)), Transport::Udp).unwrap();
        assert_eq!(huge.max_reply(), MAX_UDP_PAYLOAD as usize);

        // 20 IPv6 (28 bytes each) after a CNAME: the CNAME stays, some AAAA follow.
        let v6: Vec<IpAddr> = (0..20u16)
            .map(|i| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i]))
            .collect();
        let q6 = query("big.ns1.svc.cluster.local.", RecordType::AAAA, None);
        let r = Request::parse(&q6, Transport::Udp).unwrap();
        let r = read(&r.answer(Some("big.ns1"), &v6, 30).unwrap());
        assert!(r.metadata.truncation);
        assert_eq!(r.answers[0].record_type(), RecordType::CNAME);
        let n = r.answers.len() - 1;
        assert!((1..20).contains(&n), "{n} AAAA records");
        let r = Request::parse(&q6, Transport::Tcp).unwrap();
        let r = read(&r.answer(Some("big.ns1"), &v6, 30).unwrap());
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 21);

        // Past the TCP frame limit: what fits, without TC (there is nothing bigger).
        let many: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from((10 << 24) | i)))
            .collect();
        let r = tcp.answer(None, &many, 30).unwrap();
        assert!(r.len() <= u16::MAX as usize);
        let r = read(&r);
        assert!(!r.metadata.truncation);
        // (The encoder's own limit is somewhat below the frame's: thousands, not all.)
        assert!(
            (1000..5000).contains(&r.answers.len()),
            "{}",
            r.answers.len()
        );
    }

    #[test]
    fn upstream_query_is_the_pods_under_our_id() {
        let pod = query("www.example.net.", RecordType::A, Some(1232));
        let req = Request::parse(&pod, Transport::Udp).unwrap();
        let up = req.upstream_query(0xbeef);
        assert_eq!(read(&up).metadata.id, 0xbeef);
        assert_eq!(
            up[2..],
            pod[2..],
            "flags, question and EDNS as the pod sent them"
        );
    }

    #[test]
    fn relay_checks_the_reply_restores_the_pods_id_and_truncates_for_the_client() {
        let req = Request::parse(
            &query("www.example.net.", RecordType::A, None),
            Transport::Udp,
        )
        .unwrap();
        let ours = 0x5eed;
        let mut up = read(&req.upstream_query(ours));
        up.metadata.message_type = MessageType::Response;
        up.metadata.response_code = ResponseCode::NXDomain;
        let nx = read(&req.relay(ours, &up.to_vec().unwrap()).unwrap());
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.metadata.id, 4242, "the pod's ID, not ours");
        // The name's case may differ (0x20 encoding by resolvers).
        let mut upper = up.clone();
        upper.queries[0] =
            Query::query(Name::from_ascii("WWW.Example.NET.").unwrap(), RecordType::A);
        assert!(req.relay(ours, &upper.to_vec().unwrap()).is_ok());
        // Many records: cut for a 512-byte client, still under the pod's ID.
        up.metadata.response_code = ResponseCode::NoError;
        for ip in v4s(40) {
            let IpAddr::V4(v4) = ip else { unreachable!() };
            up.add_answer(Record::from_rdata(
                Name::from_ascii("www.example.net.").unwrap(),
                60,
                RData::A(A(v4)),
            ));
        }
        let cut = read(&req.relay(ours, &up.to_vec().unwrap()).unwrap());
        assert!(cut.metadata.truncation);
        // 12 header + 21 question + n × 16.
        assert_eq!(cut.answers.len(), 29, "the records that fit");
        assert_eq!(cut.metadata.id, 4242);
        // Not a reply to this query: the pod's own ID, another ID, another question or
        // type, a query, garbage.
        assert!(req.is_reply(ours, &up.to_vec().unwrap()));
        for other_id in [4242, 1] {
            let mut other = up.clone();
            other.metadata.id = other_id;
            assert!(req.relay(ours, &other.to_vec().unwrap()).is_err());
        }
        let mut other = up.clone();
        other.queries[0] = Query::query(Name::from_ascii("evil.example.").unwrap(), RecordType::A);
        assert!(req.relay(ours, &other.to_vec().unwrap()).is_err());
        let mut other = up.clone();
        other.queries[0] = Query::query(
            Name::from_ascii("www.example.net.").unwrap(),
            RecordType::AAAA,
        );
        assert!(req.relay(ours, &other.to_vec().unwrap()).is_err());
        assert!(req.relay(ours, &req.upstream_query(ours)).is_err());
        assert!(req.relay(ours, b"garbage").is_err());
    }

    #[test]
    fn response_id_reads_a_header_cut_short() {
        let mut r = read(&query("x.", RecordType::A, None));
        r.metadata.id = 7;
        assert_eq!(response_id(&r.to_vec().unwrap()), None, "a query");
        r.metadata.message_type = MessageType::Response;
        let bytes = r.to_vec().unwrap();
        assert_eq!(response_id(&bytes[..12]), Some(7));
        assert_eq!(response_id(&bytes[..11]), None);
    }

    #[test]
    fn what_is_not_a_query_we_serve() {
        // Garbage with a query header: FORMERR with its ID.
        let mut junk = query("x.", RecordType::A, None);
        junk.truncate(14);
        let Rejected(Some(r)) = Request::parse(&junk, Transport::Udp).unwrap_err() else {
            panic!("FORMERR expected")
        };
        assert_eq!(read(&r).metadata.response_code, ResponseCode::FormErr);
        assert_eq!(read(&r).metadata.id, 4242);
        // Too short to have an ID, or a response: silently dropped (no reflection).
        assert!(
            Request::parse(b"\x01", Transport::Udp)
                .unwrap_err()
                .0
                .is_none()
        );
        let mut resp = read(&query("x.", RecordType::A, None));
        resp.metadata.message_type = MessageType::Response;
        assert!(
            Request::parse(&resp.to_vec().unwrap(), Transport::Udp)
                .unwrap_err()
                .0
                .is_none()
        );
        // Another opcode: NOTIMP.
        let mut notify = read(&query("x.", RecordType::SOA, None));
        notify.metadata.op_code = OpCode::Notify;
        let Rejected(Some(r)) =
            Request::parse(&notify.to_vec().unwrap(), Transport::Udp).unwrap_err()
        else {
            panic!("NOTIMP expected")
        };
        assert_eq!(read(&r).metadata.response_code, ResponseCode::NotImp);
        // EDNS version 1: BADVERS, in the OPT record.
        let mut v1 = read(&query("x.", RecordType::A, Some(1232)));
        v1.edns.as_mut().unwrap().set_version(1);
        let Rejected(Some(r)) = Request::parse(&v1.to_vec().unwrap(), Transport::Udp).unwrap_err()
        else {
            panic!("BADVERS expected")
        };
        let r = read(&r);
        // 16 (BADVERS; the decoder cannot tell it from BADSIG, which shares the value).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(r.edns.is_some());
        // Two questions: FORMERR.
        let mut two = read(&query("x.", RecordType::A, None));
        two.add_query(Query::query(Name::from_ascii("y.").unwrap(), RecordType::A));
        let Rejected(Some(r)) = Request::parse(&two.to_vec().unwrap(), Transport::Udp).unwrap_err()
        else {
            panic!("FORMERR expected")
        };
        assert_eq!(read(&r).metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn metric_labels_are_a_closed_set() {
        let req = Request::parse(&query("x.", RecordType::CAA, None), Transport::Tcp).unwrap();
        assert_eq!(req.type_label(), "other");
        assert_eq!(req.transport().as_str(), "tcp");
        let req = Request::parse(&query("x.", RecordType::AAAA, None), Transport::Udp).unwrap();
        assert_eq!((req.type_label(), req.family()), ("aaaa", Some(Family::V6)));
    }
}
