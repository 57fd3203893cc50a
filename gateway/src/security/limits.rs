//! Abuse limits: how fast a connection and a user may send, how fast one client address may
//! open connections, how many connections a node holds, and which peers may speak for a client
//! through `X-Forwarded-For`.
//!
//! Rates are token buckets (GCRA, from `governor`): a sustained rate plus a burst. Everything
//! here is per node; a user connected to several nodes gets each node's budget.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::headers::header_list;

/// The limit flags (all per node; `0` turns a rate or count limit off).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// WebSocket messages (text or binary frames of any type) one connection may send per
    /// second, sustained; beyond it they are refused with `rate_limited` [0: no limit].
    #[arg(long, env = "GATEWAY_CONN_MESSAGE_RATE", default_value_t = 20)]
    pub conn_message_rate: u32,

    /// Messages one connection may send at once above its sustained rate.
    #[arg(long, env = "GATEWAY_CONN_MESSAGE_BURST", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub conn_message_burst: u32,

    /// Messages one user may send per second over all their connections to this node [0: no
    /// limit]. Anonymous users have one connection each.
    #[arg(long, env = "GATEWAY_USER_MESSAGE_RATE", default_value_t = 40)]
    pub user_message_rate: u32,

    /// Messages one user may send at once above their sustained rate.
    #[arg(long, env = "GATEWAY_USER_MESSAGE_BURST", default_value_t = 80,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub user_message_burst: u32,

    /// Refused (`rate_limited`) messages a connection may send, one more forgiven each second,
    /// before it is closed with 1008 (policy violation) [0: never close].
    #[arg(long, env = "GATEWAY_RATE_LIMIT_STRIKES", default_value_t = 50)]
    pub rate_limit_strikes: u32,

    /// New WebSocket connections one client address may open per second, sustained; beyond it
    /// the handshake gets 429 with Retry-After [0: no limit]. IPv6 clients count per /64.
    #[arg(long, env = "GATEWAY_IP_CONNECT_RATE", default_value_t = 20)]
    pub ip_connect_rate: u32,

    /// Connections one client address may open at once above its sustained rate.
    #[arg(long, env = "GATEWAY_IP_CONNECT_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ip_connect_burst: u32,

    /// Proxies (addresses or CIDR ranges, comma-separated) whose `X-Forwarded-For` names the
    /// client; from any other peer the header is ignored. E.g. 127.0.0.1/32,10.0.0.0/8.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Most WebSocket connections this node holds; beyond it handshakes get 503 with
    /// Retry-After [0: no limit].
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: u32,

    /// A client must send its complete HTTP request head (the WebSocket handshake) within
    /// this long after connecting, or the TCP connection is dropped.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
}

/// A token bucket of `rate` per second holding up to `burst`; `None` when `rate` is 0.
pub fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// Which budget refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The connection's own budget.
    Connection,
    /// The user's budget, shared by all their connections on this node.
    User,
}

impl Scope {
    /// The scope as a metric label and in reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::User => "user",
        }
    }
}

/// What the message budget says about one more message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limits.
    Allowed,
    /// Over a limit: refuse this message, keep the connection.
    Limited(Scope),
    /// Over a limit for too long: close the connection.
    Abusive(Scope),
}

/// One connection's message budget: its own bucket, its user's shared bucket, and the strikes
/// it has left before it is closed.
pub struct MessageBudget {
    connection: Option<DefaultDirectRateLimiter>,
    user: Option<UserBucket>,
    strikes: Option<DefaultDirectRateLimiter>,
}

impl MessageBudget {
    /// A budget with the given quotas (`None`: unlimited) and the user's shared bucket.
    pub fn new(
        connection: Option<Quota>,
        user: Option<UserBucket>,
        strikes: Option<Quota>,
    ) -> MessageBudget {
        MessageBudget {
            connection: connection.map(DefaultDirectRateLimiter::direct),
            user,
            strikes: strikes.map(DefaultDirectRateLimiter::direct),
        }
    }

    /// Spends one message from the budgets.
    pub fn check(&self) -> Verdict {
        let over = if self
            .connection
            .as_ref()
            .is_some_and(|limiter| limiter.check().is_err())
        {
            Scope::Connection
        } else if self
            .user
            .as_ref()
            .is_some_and(|bucket| bucket.limiter.check().is_err())
        {
            Scope::User
        } else {
            return Verdict::Allowed;
        };
        match &self.strikes {
            Some(strikes) if strikes.check().is_err() => Verdict::Abusive(over),
            _ => Verdict::Limited(over),
        }
    }
}

/// The per-user buckets of one node, each alive while its user has a connection here.
#[derive(Debug)]
pub struct UserLimiters {
    quota: Option<Quota>,
    buckets: Mutex<HashMap<String, std::sync::Weak<DefaultDirectRateLimiter>>>,
}

impl UserLimiters {
    /// Buckets of `quota` per user; `None` means no per-user limit.
    pub fn new(quota: Option<Quota>) -> Arc<UserLimiters> {
        Arc::new(UserLimiters {
            quota,
            buckets: Mutex::default(),
        })
    }

    /// The shared bucket of `user`, created on first use.
    pub fn bucket(self: &Arc<Self>, user: &str) -> Option<UserBucket> {
        let quota = self.quota?;
        let mut buckets = self.buckets.lock();
        let limiter = match buckets.get(user).and_then(std::sync::Weak::upgrade) {
            Some(limiter) => limiter,
            None => {
                let limiter = Arc::new(DefaultDirectRateLimiter::direct(quota));
                buckets.insert(user.to_owned(), Arc::downgrade(&limiter));
                limiter
            }
        };
        Some(UserBucket {
            limiter,
            user: user.to_owned(),
            registry: self.clone(),
        })
    }

    /// How many users have a bucket now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().len()
    }

    /// Whether no user has a bucket.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's handle on its user's bucket; the bucket goes when the last handle does.
pub struct UserBucket {
    limiter: Arc<DefaultDirectRateLimiter>,
    user: String,
    registry: Arc<UserLimiters>,
}

impl Drop for UserBucket {
    fn drop(&mut self) {
        // New handles are only made under this lock, so a count of one here is final.
        let mut buckets = self.registry.buckets.lock();
        if Arc::strong_count(&self.limiter) == 1 {
            buckets.remove(&self.user);
        }
    }
}

/// New connections per client address.
pub struct ConnectLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl ConnectLimiter {
    /// A limiter with `quota` per address; `None` means no limit.
    pub fn new(quota: Option<Quota>) -> ConnectLimiter {
        ConnectLimiter {
            limiter: quota.map(DefaultKeyedRateLimiter::keyed),
        }
    }

    /// Counts a connection attempt from `ip`; `Err` carries how long until one is allowed.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&rate_key(ip))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets addresses whose buckets are full again, so the table stays small.
    pub fn upkeep(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64 (one subscriber's
/// network, which it can pick addresses from at will).
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// The node's connection count against its maximum.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    max: usize,
    open: Arc<AtomicUsize>,
}

impl ConnectionCap {
    /// At most `max` connections; 0 means no limit (connections are still counted).
    pub fn new(max: usize) -> ConnectionCap {
        ConnectionCap {
            max,
            open: Arc::default(),
        }
    }

    /// Takes a slot, or `None` when the node is full.
    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        let max = if self.max == 0 { usize::MAX } else { self.max };
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        Some(ConnectionSlot(self.open.clone()))
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One connection's place under the cap, given back on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address range `{0}`: expected an IP address or CIDR such as 10.0.0.0/8")]
pub struct InvalidIpNet(String);

/// Parses an address range (`10.0.0.0/8`) or one address (`127.0.0.1`, a /32 or /128).
pub fn parse_net(text: &str) -> Result<IpNet, InvalidIpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| InvalidIpNet(text.to_owned()))
}

/// The peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts the given ranges.
    pub fn new(ranges: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(ranges)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        // A v4 peer on a dual-stack socket shows as an IPv4-mapped IPv6 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case
    /// `X-Forwarded-For` is read from the right (the entry the nearest proxy added), skipping
    /// trusted proxies, up to the first address that is not one. A malformed entry ends the
    /// walk there, so a client cannot hide behind garbage.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let entries: Vec<&str> = header_list(headers.get_all("x-forwarded-for")).collect();
        let mut client = peer;
        for entry in entries.iter().rev() {
            if !self.trusts(client) {
                break;
            }
            match parse_forwarded_ip(entry) {
                Some(ip) => client = ip,
                None => break,
            }
        }
        client
    }

    /// How the client reached the gateway: `https` when a trusted proxy says so in
    /// `X-Forwarded-Proto` (it terminated TLS), `http` otherwise.
    pub fn scheme(&self, peer: IpAddr, headers: &HeaderMap) -> &'static str {
        let forwarded_https = self.trusts(peer)
            && header_list(headers.get_all("x-forwarded-proto"))
                .next()
                .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
        if forwarded_https { "https" } else { "http" }
    }
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry.parse::<IpAddr>().ok().or_else(|| {
        entry
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|addr| addr.ip())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_and_single_addresses_parse_and_match() {
        let trusted = |nets: &[&str]| {
            TrustedProxies::new(nets.iter().map(|net| parse_net(net).unwrap()).collect())
        };
        let private = trusted(&["10.0.0.0/8"]);
        assert!(private.trusts(ip("10.1.2.3")));
        assert!(!private.trusts(ip("11.0.0.1")));
        assert!(private.trusts(ip("::ffff:10.0.0.1")), "IPv4-mapped");
        let one = trusted(&["127.0.0.1"]);
        assert!(one.trusts(ip("127.0.0.1")) && !one.trusts(ip("127.0.0.2")));
        assert!(trusted(&["0.0.0.0/0"]).trusts(ip("8.8.8.8")));
        let v6 = trusted(&["fd00::/8"]);
        assert!(v6.trusts(ip("fd12::1")) && !v6.trusts(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = TrustedProxies::new(vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]);
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            trusted.client_ip(ip("127.0.0.1"), &headers),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.client_ip(ip("198.51.100.1"), &headers),
            ip("198.51.100.1"),
            "an untrusted peer cannot claim another address"
        );
        // A client-supplied entry to the left of the real one is ignored.
        let headers = forwarded(&["1.1.1.1, 203.0.113.9, 10.0.0.5"]);
        assert_eq!(
            trusted.client_ip(ip("127.0.0.1"), &headers),
            ip("203.0.113.9")
        );
        // Several header lines read as one list.
        let headers = forwarded(&["1.1.1.1", "203.0.113.9:4444"]);
        assert_eq!(
            trusted.client_ip(ip("10.1.1.1"), &headers),
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the last trusted hop.
        let headers = forwarded(&["203.0.113.9, garbage"]);
        assert_eq!(
            trusted.client_ip(ip("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
        // No header: the peer.
        assert_eq!(
            trusted.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        // Nobody trusted: the peer, always.
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_slash_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        let limiter = ConnectLimiter::new(quota(1, 2));
        assert!(limiter.check(ip("2001:db8::1")).is_ok());
        assert!(limiter.check(ip("2001:db8::2")).is_ok());
        let wait = limiter.check(ip("2001:db8::3")).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(
            limiter.check(ip("2001:db9::1")).is_ok(),
            "another network has its own budget"
        );
    }

    #[test]
    fn the_connection_cap_gives_slots_back() {
        let cap = ConnectionCap::new(2);
        let a = cap.try_acquire().unwrap();
        let _b = cap.try_acquire().unwrap();
        assert!(cap.try_acquire().is_none());
        drop(a);
        assert_eq!(cap.open(), 1);
        assert!(cap.try_acquire().is_some());
        assert!(ConnectionCap::new(0).try_acquire().is_some());
    }

    #[test]
    fn budgets_limit_then_strike_out() {
        let users = UserLimiters::new(None);
        let budget = MessageBudget::new(quota(1, 3), users.bucket("u"), quota(1, 2));
        for _ in 0..3 {
            assert_eq!(budget.check(), Verdict::Allowed);
        }
        assert_eq!(budget.check(), Verdict::Limited(Scope::Connection));
        assert_eq!(budget.check(), Verdict::Limited(Scope::Connection));
        assert_eq!(budget.check(), Verdict::Abusive(Scope::Connection));
        let unlimited = MessageBudget::new(None, None, None);
        for _ in 0..10_000 {
            assert_eq!(unlimited.check(), Verdict::Allowed);
        }
    }

    #[test]
    fn a_user_shares_one_bucket_across_connections() {
        let users = UserLimiters::new(quota(1, 3));
        let a = MessageBudget::new(None, users.bucket("alice"), None);
        let b = MessageBudget::new(None, users.bucket("alice"), None);
        let bob = MessageBudget::new(None, users.bucket("bob"), None);
        assert_eq!(users.len(), 2);
        assert_eq!(a.check(), Verdict::Allowed);
        assert_eq!(b.check(), Verdict::Allowed);
        assert_eq!(a.check(), Verdict::Allowed);
        assert_eq!(b.check(), Verdict::Limited(Scope::User));
        assert_eq!(bob.check(), Verdict::Allowed);
        drop(a);
        assert_eq!(users.len(), 2, "alice still has a connection");
        drop(b);
        drop(bob);
        assert!(users.is_empty(), "buckets go with their last connection");
    }
}
