//! Who may open a connection, before it costs anything: at most
//! `--max-connections` on this edge, `--max-connections-per-ip` from one
//! client address, and `--max-pending-connections` still authenticating
//! (upgraded, no valid `connect` yet). The client's address is the peer's,
//! or, when the peer is one of `--trusted-proxies`, the last address in
//! `X-Forwarded-For` that is not a trusted proxy (the rightmost hop a
//! trusted proxy vouches for; anything left of it the client could have
//! written). Over a cap, the upgrade gets HTTP 503 with `Retry-After`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The caps; 0 means none.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub max_connections: usize,
    pub max_per_ip: usize,
    pub max_pending: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// How long a refused client is told to wait.
pub const RETRY_AFTER_SECS: u64 = 5;

/// The caps and what they count.
pub struct Admission {
    caps: Caps,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    pending: AtomicUsize,
}

/// Why a connection was refused, in plain words for its 503.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// A connection's places under the caps, given back when dropped: the
/// pending one once it authenticates (or gives up), the address one when
/// the connection ends.
pub struct Ticket {
    pub pending: Option<Pending>,
    pub address: Option<AddressSlot>,
}

pub struct Pending(Arc<Admission>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct AddressSlot(Arc<Admission>, IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut per_ip = self.0.per_ip.lock().expect("per-ip counts");
        if let Some(n) = per_ip.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.1);
            }
        }
    }
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            per_ip: Mutex::default(),
            pending: AtomicUsize::new(0),
        })
    }

    /// The client's address: the peer's, or from `X-Forwarded-For` when
    /// the peer is a trusted proxy.
    pub fn client_address(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.caps.trusted_proxies.iter().any(|n| n.contains(ip));
        let peer = peer.ip().to_canonical();
        if !trusted(&peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map_while(|hop| hop.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        hops.into_iter()
            .rev()
            .find(|ip| !trusted(ip))
            .unwrap_or(peer)
    }

    /// Takes places for a new connection from `peer` while `open` are open
    /// on this edge; `authenticated` connections (SSE: the token was checked
    /// first) take no pending place.
    pub fn admit(
        self: &Arc<Self>,
        open: usize,
        peer: SocketAddr,
        headers: &HeaderMap,
        authenticated: bool,
    ) -> Result<Ticket, Refused> {
        let caps = &self.caps;
        if caps.max_connections > 0 && open >= caps.max_connections {
            return Err(Refused(format!(
                "this edge holds its maximum of {} connections; try again or another edge",
                caps.max_connections
            )));
        }
        let pending = if authenticated || caps.max_pending == 0 {
            None
        } else {
            let before = self.pending.fetch_add(1, Ordering::Relaxed);
            let slot = Pending(self.clone());
            if before >= caps.max_pending {
                return Err(Refused(format!(
                    "{} connections are already authenticating on this edge; try again",
                    caps.max_pending
                )));
            }
            Some(slot)
        };
        let address = if caps.max_per_ip == 0 {
            None
        } else {
            let ip = self.client_address(peer, headers);
            let mut per_ip = self.per_ip.lock().expect("per-ip counts");
            let n = per_ip.entry(ip).or_insert(0);
            if *n as usize >= caps.max_per_ip {
                return Err(Refused(format!(
                    "{ip} holds its maximum of {} connections to this edge",
                    caps.max_per_ip
                )));
            }
            *n += 1;
            Some(AddressSlot(self.clone(), ip))
        };
        Ok(Ticket { pending, address })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        format!("{s}:4000").parse().unwrap()
    }

    fn caps(per_ip: usize, pending: usize, total: usize) -> Arc<Admission> {
        Admission::new(Caps {
            max_connections: total,
            max_per_ip: per_ip,
            max_pending: pending,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        })
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let a = caps(0, 0, 0);
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.7, 10.1.2.3".parse().unwrap(),
        );
        // Through a trusted proxy: the rightmost untrusted hop.
        assert_eq!(
            a.client_address(addr("10.9.9.9"), &h),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // From anywhere else the header is the client's own words.
        assert_eq!(
            a.client_address(addr("198.51.100.1"), &h),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            a.client_address(addr("10.9.9.9"), &HeaderMap::new()),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn caps_refuse_past_their_count_and_give_places_back() {
        let a = caps(2, 0, 0);
        let h = HeaderMap::new();
        let one = a.admit(0, addr("192.0.2.1"), &h, false).unwrap();
        let _two = a.admit(1, addr("192.0.2.1"), &h, false).unwrap();
        let e = a.admit(2, addr("192.0.2.1"), &h, false).err().unwrap();
        assert!(e.0.contains("192.0.2.1"), "{e:?}");
        assert!(
            a.admit(2, addr("192.0.2.2"), &h, false).is_ok(),
            "another address"
        );
        drop(one);
        assert!(
            a.admit(2, addr("192.0.2.1"), &h, false).is_ok(),
            "a place came back"
        );

        let total = caps(0, 0, 3);
        assert!(total.admit(3, addr("192.0.2.1"), &h, false).is_err());
        assert!(total.admit(2, addr("192.0.2.1"), &h, false).is_ok());

        let pending = caps(0, 1, 0);
        let first = pending.admit(0, addr("192.0.2.1"), &h, false).unwrap();
        assert!(pending.admit(1, addr("192.0.2.2"), &h, false).is_err());
        assert!(
            pending.admit(1, addr("192.0.2.2"), &h, true).is_ok(),
            "SSE is authenticated"
        );
        drop(first.pending);
        assert!(pending.admit(1, addr("192.0.2.2"), &h, false).is_ok());
        assert!(
            a.per_ip.lock().unwrap().len() <= 2,
            "counts are removed at zero"
        );
    }
}
