//! Any X-Forwarded-For values from any peer → the client address: never
//! panics; the peer's own address unless the peer is trusted and the header
//! parses, and then an address that is written in the header.
#![no_main]

use std::net::IpAddr;

use cutover::policy::client_ip::{client_ip_from, Source};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&p, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks the peer: trusted (10.x, 127.0.0.1) or not.
    let peer: IpAddr = match p % 4 {
        0 => "10.1.2.3".parse().unwrap(),
        1 => "127.0.0.1".parse().unwrap(),
        2 => "::ffff:10.9.9.9".parse().unwrap(),
        _ => "192.0.2.50".parse().unwrap(),
    };
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let model = common::model();
    let (ip, source) = client_ip_from(&model.client_ip, peer, values.iter().copied());
    let canonical = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    match source {
        Source::Peer | Source::MalformedHeader => assert_eq!(ip, canonical),
        Source::Header => {
            assert!(
                matches!(p % 4, 0..=2),
                "an untrusted peer's header was believed"
            );
            // It is one of the addresses written in the header.
            let written: Vec<IpAddr> = values
                .iter()
                .filter_map(|v| std::str::from_utf8(v).ok())
                .flat_map(|v| v.split(','))
                .filter_map(|item| {
                    let item = item.trim();
                    item.parse::<IpAddr>()
                        .ok()
                        .or_else(|| item.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
                })
                .map(|ip| match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                })
                .collect();
            assert!(written.contains(&ip), "{ip} is not one of {written:?}");
        }
    }
});
