//! A network namespace of the test's own, joined to the test's namespace by
//! a veth pair with private addresses on both ends (10.77.N.0/24 and
//! fd77:N::/64). Created by [`Netns::create`], removed on drop: deleting the
//! namespace deletes its end of the pair, and with it the other end.

use std::net::IpAddr;
use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Netns {
    pub name: String,
    host_if: String,
    /// The subnet index N of 10.77.N.0/24 and fd77:N::/64.
    n: u32,
    pub ipv6: bool,
}

impl Netns {
    /// A namespace with lo up and one veth link; `ipv6: false` disables
    /// IPv6 in it altogether (`net.ipv6.conf.all.disable_ipv6 = 1`), as on
    /// an EC2 instance in an IPv4-only subnet.
    pub fn create(ipv6: bool) -> Netns {
        // A free subnet index: the first whose veth name is not taken (other
        // test processes run at the same time).
        let mut n = std::process::id() % 250 + 1;
        let (host_if, ns_if) = loop {
            let host_if = format!("cvh{n}");
            let ns_if = format!("cvn{n}");
            let made = Command::new("ip")
                .args([
                    "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
                ])
                .output()
                .expect("`ip` (iproute2) runs");
            if made.status.success() {
                break (host_if, ns_if);
            }
            n = n % 250 + 1;
        };
        let name = format!("cutover-t{}-{n}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        if !made.status.success() {
            let _ = Command::new("ip").args(["link", "del", &host_if]).output();
            panic!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&made.stderr)
            );
        }
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            n,
            ipv6,
        };
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["link", "set", &host_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        if !ipv6 {
            ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.77.{n}.100/24"),
            "dev",
            &ns_if,
        ]);
        if ipv6 {
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("fd77:{n}::100/64"),
                "dev",
                &ns_if,
                "nodad",
            ]);
        }
        ns.exec(&["ip", "link", "set", &ns_if, "up"]);
        ns
    }

    /// Limit what the test's side sends into the namespace (its servers'
    /// answers to a process inside) to `rate` (`tc` syntax, e.g. `8mbit`)
    /// with a token bucket; the qdisc goes with the link.
    pub fn limit_rate(&self, rate: &str) {
        let out = Command::new("tc")
            .args([
                "qdisc",
                "add",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kbit",
                "latency",
                "400ms",
            ])
            .output()
            .expect("`tc` (iproute2) runs");
        assert!(
            out.status.success(),
            "tc qdisc add tbf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An address whose packets vanish, seen from inside: 10.78.N.k,
    /// routed out of a veth inside the namespace whose peer is down (it
    /// drops what it is given), with a permanent neighbour entry so no ARP
    /// is asked: a connect from inside hangs until its own timeout, as
    /// toward a blackholed edge address. Nothing leaves the namespace.
    pub fn vanishing_v4(&self, k: u8) -> IpAddr {
        let (dev, peer) = (format!("cva{}", self.n), format!("cvb{}", self.n));
        let exists = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip", "link", "show", &dev])
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            self.exec(&[
                "ip", "link", "add", &dev, "type", "veth", "peer", "name", &peer,
            ]);
            self.exec(&["ip", "link", "set", &dev, "up"]);
            let net = format!("10.78.{}.0/24", self.n);
            self.exec(&["ip", "route", "add", &net, "dev", &dev]);
        }
        let addr = format!("10.78.{}.{k}", self.n);
        let mac = format!("02:00:00:00:00:{k:02x}");
        self.exec(&[
            "ip",
            "neigh",
            "add",
            &addr,
            "lladdr",
            &mac,
            "dev",
            &dev,
            "nud",
            "permanent",
        ]);
        addr.parse().unwrap()
    }

    /// Run a command inside the namespace; it must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// The namespace side's IPv4 address.
    pub fn inside(&self) -> IpAddr {
        format!("10.77.{}.100", self.n).parse().unwrap()
    }

    /// Add host-side address `k` (1..=99) of each family to the link and
    /// return them: addresses the test's servers bind and the namespace
    /// reaches through the link.
    pub fn host_v4(&self, k: u8) -> IpAddr {
        let a = format!("10.77.{}.{k}", self.n);
        ip(&["addr", "add", &format!("{a}/24"), "dev", &self.host_if]);
        a.parse().unwrap()
    }

    pub fn host_v6(&self, k: u8) -> IpAddr {
        let a = format!("fd77:{}::{k}", self.n);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            &self.host_if,
            "nodad",
        ]);
        a.parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
