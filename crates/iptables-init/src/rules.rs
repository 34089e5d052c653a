//! The capture rules, rendered as `iptables-restore --noflush` input: a pure function
//! of a [`Config`], an address family and what the `nat` table holds now.
//!
//! This module never runs anything; [`crate::apply`] feeds its text to the kernel.
//!
//! # The rules, in order
//!
//! Everything lives in the `nat` table, in four chains of our own. Declaring a chain
//! in a `--noflush` restore flushes it, so every run refills our chains from scratch
//! and touches nothing else; the two jump rules from the built-in chains are added
//! only when missing (and stale or duplicate jumps into our chains are deleted), so a
//! second run yields the same rule set as the first.
//!
//! ```text
//! PREROUTING         -p tcp -j ISTHMUS_PREROUTING
//! OUTPUT             -p tcp -j ISTHMUS_OUTPUT
//!
//! ISTHMUS_PREROUTING (TCP arriving at the pod)
//!   1 -p tcp --dport <inbound-port>         RETURN   already addressed to the proxy (mTLS from a gateway)
//!   2 -p tcp --dports <skip-inbound-ports>  RETURN   admin port 4191 by default: probes reach it directly
//!   3 -p tcp                                ISTHMUS_INBOUND
//! ISTHMUS_INBOUND
//!   1 -p tcp REDIRECT --to-ports <inbound-port>
//!
//! ISTHMUS_OUTPUT (TCP opened inside the pod)
//!   1 -s 127.0.0.6 -o lo                    RETURN   the proxy delivering inbound traffic to the app
//!   2 ! -d 127.0.0.0/8 -o lo -p tcp, owner = proxy UID
//!                                           ISTHMUS_PREROUTING   the proxy calling its own pod IP
//!   3 -o lo, owner != proxy UID             RETURN   the app calling itself, by pod IP or loopback
//!   4 owner = proxy UID                     RETURN   the proxy's own upstream connections
//!   5 -d 127.0.0.0/8                        RETURN   loopback is never captured
//!   6 -p tcp --dports <skip-outbound-ports> RETURN
//!   7 -d <skip-outbound-subnet>             RETURN   (one rule each)
//!   8 -p tcp [-d <include-subnet>]          ISTHMUS_REDIRECT   (one rule per included subnet, or one for all)
//! ISTHMUS_REDIRECT
//!   1 -p tcp REDIRECT --to-ports <outbound-port>
//! ```
//!
//! Why rules 1 to 4 look the way they do (after istio-iptables): a connection
//! between two sockets of the same pod leaves through `lo`, and the `nat` table sees
//! only its first packet, in `OUTPUT`; `PREROUTING` never sees it. So:
//!
//! - When the proxy, forwarding an outbound connection, dials its own pod IP (the app
//!   called a Service that is backed by this very pod), rule 2 sends that connection
//!   through the inbound rules, so it lands on the inbound port like any other
//!   inbound connection, with its original destination intact. The jump returns into
//!   `ISTHMUS_OUTPUT` for skipped inbound ports, and rule 4 then lets it through.
//! - The proxy's inbound side therefore must not reach the app by dialling the pod IP
//!   from the pod IP, or rule 2 would send it back to itself: it dials the pod IP
//!   from the source `127.0.0.6` (IPv6: `::6`, which `isthmus-init --ipv6` adds to `lo`),
//!   which rule 1 lets through, or, for a pod that opted in to loopback delivery
//!   (`--inbound-loopback`), dials `127.0.0.1`.
//! - Rule 3 lets the app talk to itself without a detour through the proxy.
//! - Rule 4 keeps the proxy's own connections from being captured a second time.
//!
//! Skipped subnets win over included ones because their `RETURN` comes first. With a
//! non-empty include list, a family none of whose networks is listed gets no outbound
//! capture at all. IPv6 uses `::1/128` for loopback and `::6` for the proxy's
//! inbound source.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::config::{Cidr, Config, Family, PortRange};

/// Entered from `PREROUTING` for TCP arriving at the pod.
pub const CHAIN_PREROUTING: &str = "ISTHMUS_PREROUTING";
/// Redirects to the inbound port.
pub const CHAIN_INBOUND: &str = "ISTHMUS_INBOUND";
/// Entered from `OUTPUT` for TCP opened inside the pod.
pub const CHAIN_OUTPUT: &str = "ISTHMUS_OUTPUT";
/// Redirects to the outbound port.
pub const CHAIN_REDIRECT: &str = "ISTHMUS_REDIRECT";
/// Every chain this crate owns, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    CHAIN_PREROUTING,
    CHAIN_INBOUND,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// The built-in chains that jump into ours, and the chain each jumps to.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", CHAIN_PREROUTING), ("OUTPUT", CHAIN_OUTPUT)];

/// `multiport` takes at most 15 ports per rule, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// What the `nat` table of one family holds now, as far as rendering needs to know:
/// the chains it declares and its rules, each as the `-A ...` line `iptables-save`
/// prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    chains: BTreeSet<String>,
    rules: Vec<String>,
}

impl NatState {
    /// Reads the `*nat` section of `iptables-save` output; other tables are ignored,
    /// and output without a `nat` table is an empty state.
    pub fn parse(save_output: &str) -> Self {
        let mut state = Self::default();
        let mut in_nat = false;
        for line in save_output.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    state.chains.insert(name.to_owned());
                }
            } else if line.starts_with("-A ") {
                state.rules.push(line.to_owned());
            }
        }
        state
    }

    /// Whether any of our chains exists.
    pub fn holds_our_chains(&self) -> bool {
        CHAINS.iter().any(|c| self.chains.contains(*c))
    }

    /// Our chains that exist.
    pub fn our_chains(&self) -> impl Iterator<Item = &'static str> + '_ {
        CHAINS.into_iter().filter(|c| self.chains.contains(*c))
    }

    /// Every rule of the table, as `-A CHAIN ...` lines.
    pub fn rules(&self) -> &[String] {
        &self.rules
    }

    /// Everything of ours this table holds: our chains by name, then each rule of
    /// another chain that jumps into one of them, as saved. Empty once a cleanup
    /// has done its work.
    pub fn leftovers(&self) -> Vec<String> {
        self.our_chains()
            .map(str::to_owned)
            .chain(self.jumps_into_ours().map(|rule| format!("`{rule}`")))
            .collect()
    }

    /// Rules outside our chains that jump (or go) to one of them.
    fn jumps_into_ours(&self) -> impl Iterator<Item = &String> + '_ {
        self.rules.iter().filter(|rule| {
            let chain = rule_chain(rule);
            !chain.is_some_and(is_ours) && rule_target(rule).is_some_and(is_ours)
        })
    }
}

/// Whether `chain` is one of the chains this crate owns.
pub fn is_ours(chain: &str) -> bool {
    CHAINS.contains(&chain)
}

fn rule_chain(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    (words.next() == Some("-A")).then(|| words.next()).flatten()
}

fn rule_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if matches!(word, "-j" | "--jump" | "-g" | "--goto") {
            return words.next();
        }
    }
    None
}

/// The `-D` line that deletes the rule saved as `rule` (`-A CHAIN spec`).
fn delete_line(rule: &str) -> String {
    format!("-D{}", rule.strip_prefix("-A").unwrap_or(rule))
}

fn jump_rule(from: &str, to: &str) -> String {
    format!("-A {from} -p tcp -j {to}")
}

fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    }
}

/// The source the proxy binds when it delivers inbound traffic to the app.
fn inbound_source(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.6/32",
        Family::V6 => "::6/128",
    }
}

/// Port ranges as `multiport --dports` arguments, split so no rule exceeds the
/// match's limit.
fn multiport_groups(ranges: &[PortRange]) -> Vec<String> {
    let mut groups = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut slots = 0;
    for range in ranges {
        let (text, cost) = if range.first() == range.last() {
            (range.first().to_string(), 1)
        } else {
            (format!("{}:{}", range.first(), range.last()), 2)
        };
        if slots + cost > MULTIPORT_SLOTS {
            groups.push(current.join(","));
            current.clear();
            slots = 0;
        }
        current.push(text);
        slots += cost;
    }
    if !current.is_empty() {
        groups.push(current.join(","));
    }
    groups
}

fn subnets_of(list: &[Cidr], family: Family) -> impl Iterator<Item = &Cidr> {
    list.iter().filter(move |c| c.family() == family)
}

/// The restore input that installs (or refreshes) the capture for `family`, given
/// what its `nat` table holds now. Feed it to `iptables-restore --noflush` (or the
/// `ip6tables` one for [`Family::V6`]).
pub fn render_install(config: &Config, family: Family, current: &NatState) -> String {
    let uid = config.proxy_uid;
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        push(&mut out, format_args!(":{chain} - [0:0]"));
    }

    // Inbound.
    push(
        &mut out,
        format_args!(
            "-A {CHAIN_PREROUTING} -p tcp -m tcp --dport {} -j RETURN",
            config.inbound_port
        ),
    );
    for ports in multiport_groups(config.skip_inbound_ports.ranges()) {
        push(
            &mut out,
            format_args!("-A {CHAIN_PREROUTING} -p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    push(
        &mut out,
        format_args!("-A {CHAIN_PREROUTING} -p tcp -j {CHAIN_INBOUND}"),
    );
    push(
        &mut out,
        format_args!(
            "-A {CHAIN_INBOUND} -p tcp -j REDIRECT --to-ports {}",
            config.inbound_port
        ),
    );

    // Outbound; the module doc explains the order of the first four.
    let lo = loopback(family);
    push(
        &mut out,
        format_args!(
            "-A {CHAIN_OUTPUT} -s {} -o lo -j RETURN",
            inbound_source(family)
        ),
    );
    push(
        &mut out,
        format_args!(
            "-A {CHAIN_OUTPUT} ! -d {lo} -o lo -p tcp -m owner --uid-owner {uid} -j {CHAIN_PREROUTING}"
        ),
    );
    push(
        &mut out,
        format_args!("-A {CHAIN_OUTPUT} -o lo -m owner ! --uid-owner {uid} -j RETURN"),
    );
    push(
        &mut out,
        format_args!("-A {CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN"),
    );
    push(
        &mut out,
        format_args!("-A {CHAIN_OUTPUT} -d {lo} -j RETURN"),
    );
    for ports in multiport_groups(config.skip_outbound_ports.ranges()) {
        push(
            &mut out,
            format_args!("-A {CHAIN_OUTPUT} -p tcp -m multiport --dports {ports} -j RETURN"),
        );
    }
    for cidr in subnets_of(&config.skip_outbound_subnets, family) {
        push(
            &mut out,
            format_args!("-A {CHAIN_OUTPUT} -d {cidr} -j RETURN"),
        );
    }
    if config.include_outbound_subnets.is_empty() {
        push(
            &mut out,
            format_args!("-A {CHAIN_OUTPUT} -p tcp -j {CHAIN_REDIRECT}"),
        );
    } else {
        for cidr in subnets_of(&config.include_outbound_subnets, family) {
            push(
                &mut out,
                format_args!("-A {CHAIN_OUTPUT} -d {cidr} -p tcp -j {CHAIN_REDIRECT}"),
            );
        }
    }
    push(
        &mut out,
        format_args!(
            "-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            config.outbound_port
        ),
    );

    // Exactly one jump from each built-in chain: keep ours if present, delete any
    // other jump into our chains (an older version's, or a duplicate).
    for (from, to) in JUMPS {
        let wanted = jump_rule(from, to);
        let mut present = false;
        for rule in current
            .jumps_into_ours()
            .filter(|r| rule_chain(r) == Some(from))
        {
            if *rule == wanted && !present {
                present = true;
            } else {
                push(&mut out, format_args!("{}", delete_line(rule)));
            }
        }
        if !present {
            push(&mut out, format_args!("{wanted}"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The restore input that removes everything [`render_install`] put in place and
/// nothing else: every jump into our chains, then our chains. `None` when the table
/// holds nothing of ours.
pub fn render_cleanup(current: &NatState) -> Option<String> {
    if !current.holds_our_chains() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for rule in current.jumps_into_ours() {
        push(&mut out, format_args!("{}", delete_line(rule)));
    }
    for chain in current.our_chains() {
        push(&mut out, format_args!("-F {chain}"));
    }
    for chain in current.our_chains() {
        push(&mut out, format_args!("-X {chain}"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

fn push(out: &mut String, line: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(line);
    out.push('\n');
}

#[cfg(test)]
mod tests;
