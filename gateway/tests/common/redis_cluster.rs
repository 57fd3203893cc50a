//! Real Redis topologies beyond one server: a Redis Cluster (`--cluster-enabled yes` and
//! `redis-cli --cluster create`), and a Sentinel-managed primary with a replica. Every process
//! is a [`Redis`] and dies with its handle.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use super::{Persistence, Process, Redis, SharedRedis, TempDir, free_port, temp_dir, wait_until};

/// A Redis Cluster on loopback: `masters` primaries sharing the 16384 slots, each with
/// `replicas` replicas.
pub struct RedisCluster {
    members: Vec<Redis>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct ClusterNode {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    /// Slot ranges it serves (primaries).
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts the servers, creates the cluster and waits until every slot is served (and every
    /// replica has synced).
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let members: Vec<Redis> = (0..masters * (1 + replicas))
            .map(|_| {
                let bus = free_port().to_string();
                // A failed primary is noticed within a second, so failover tests stay short.
                Redis::start_with_args(
                    Persistence::None,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus,
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = members
            .iter()
            .map(|member| format!("127.0.0.1:{}", member.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = RedisCluster { members };
        cluster.wait_healthy();
        cluster
    }

    /// Waits until every live member says the cluster is OK and knows `masters` serving
    /// primaries, and every replica's link to its primary is up.
    pub fn wait_healthy(&self) {
        wait_until("the Redis Cluster to be healthy", || {
            self.live().all(|member| {
                let info = member.command(&["CLUSTER", "INFO"]).unwrap_or_default();
                let replication = member.command(&["INFO", "replication"]).unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            }) && self
                .nodes()
                .iter()
                .all(|node| !node.failed && (!node.master || !node.slots.is_empty()))
        });
    }

    fn live(&self) -> impl Iterator<Item = &Redis> {
        self.members.iter().filter(|member| member.is_running())
    }

    fn member(&self, port: u16) -> &Redis {
        self.members
            .iter()
            .find(|member| member.port == port)
            .expect("a member of this cluster")
    }

    /// The cluster as a live member sees it.
    fn nodes(&self) -> Vec<ClusterNode> {
        let Some(reply) = self
            .live()
            .find_map(|member| member.command(&["CLUSTER", "NODES"]).ok())
        else {
            return Vec::new();
        };
        reply.lines().filter_map(parse_node).collect()
    }

    /// The ports of the primaries that serve slots.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes()
            .into_iter()
            .filter(|node| node.master && !node.failed && !node.slots.is_empty())
            .map(|node| node.port)
            .collect()
    }

    fn id_of(&self, port: u16) -> String {
        self.member(port)
            .command(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
    }

    /// The hash slot of `room`'s keys and channel (they share the `{room}` hash tag).
    pub fn slot_of(&self, room: &str) -> u16 {
        self.live()
            .next()
            .expect("a live member")
            .command(&["CLUSTER", "KEYSLOT", room])
            .expect("CLUSTER KEYSLOT")
            .parse()
            .expect("a slot number")
    }

    /// The port of the primary serving `room`.
    pub fn owner(&self, room: &str) -> u16 {
        let slot = self.slot_of(room);
        self.nodes()
            .into_iter()
            .find(|node| {
                node.master
                    && !node.failed
                    && node
                        .slots
                        .iter()
                        .any(|&(first, last)| (first..=last).contains(&slot))
            })
            .map(|node| node.port)
            .expect("every slot is served")
    }

    /// Per serving primary, the rooms whose shard channel has subscribers on it.
    pub fn rooms_by_master(&self) -> BTreeMap<u16, Vec<String>> {
        self.masters()
            .into_iter()
            .map(|port| (port, self.member(port).subscribed_rooms()))
            .collect()
    }

    /// Classic (not sharded) pub/sub channels with subscribers, on any member.
    pub fn classic_channels(&self) -> Vec<String> {
        self.live()
            .flat_map(|member| {
                member
                    .command(&["PUBSUB", "CHANNELS"])
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Moves `room`'s slot, with its keys, to the primary on `to`, the way `redis-cli --cluster
    /// reshard` moves a slot: importing/migrating, `MIGRATE` of every key, then the new owner
    /// announced to every primary.
    pub fn move_slot(&self, room: &str, to: u16) {
        let slot = self.slot_of(room).to_string();
        let from = self.owner(room);
        assert_ne!(from, to, "the room is already there");
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        let (source, target) = (self.member(from), self.member(to));
        target
            .command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .expect("SETSLOT IMPORTING");
        source
            .command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .expect("SETSLOT MIGRATING");
        loop {
            let keys = source
                .command(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.lines());
            let reply = source.command(&migrate).expect("MIGRATE");
            assert!(reply == "OK" || reply == "NOKEY", "MIGRATE: {reply}");
        }
        for port in std::iter::once(to)
            .chain(std::iter::once(from))
            .chain(self.masters())
        {
            self.member(port)
                .command(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
                .expect("SETSLOT NODE");
        }
        wait_until("every member to agree on the slot's owner", || {
            self.live().all(|member| {
                member
                    .command(&["CLUSTER", "NODES"])
                    .unwrap_or_default()
                    .lines()
                    .filter_map(parse_node)
                    .any(|node| {
                        node.port == to
                            && node.slots.iter().any(|&(first, last)| {
                                (first..=last).contains(&slot.parse().unwrap_or(0))
                            })
                    })
            })
        });
    }

    /// Kills the primary on `port` (SIGKILL) and returns at once.
    pub fn kill_master_now(&mut self, port: u16) {
        self.members
            .iter_mut()
            .find(|member| member.port == port)
            .expect("a member of this cluster")
            .kill();
    }

    /// Kills the primary on `port` (SIGKILL) and waits until its replica serves its slots.
    pub fn kill_master(&mut self, port: u16) {
        self.kill_master_now(port);
        wait_until("a replica to take over the killed primary's slots", || {
            let served: usize = self
                .nodes()
                .iter()
                .filter(|node| node.master && !node.failed && node.port != port)
                .flat_map(|node| node.slots.iter())
                .map(|&(first, last)| usize::from(last - first) + 1)
                .sum();
            served == 16384
                && self.live().all(|member| {
                    member
                        .command(&["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                })
        });
    }
}

impl SharedRedis for RedisCluster {
    /// `redis-cluster://first?node=second&node=…`: every member is a seed.
    fn url(&self) -> String {
        let mut ports = self.members.iter().map(|member| member.port);
        let first = ports.next().expect("a cluster has members");
        let others: Vec<String> = ports.map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", others.join("&"))
    }

    fn subscribed_rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self.rooms_by_master().into_values().flatten().collect();
        rooms.sort();
        rooms
    }

    fn subscribers(&self, room: &str) -> u64 {
        self.member(self.owner(room)).subscribers(room)
    }
}

/// Reads one `CLUSTER NODES` line: `id host:port@bus[,hostname] flags master ping pong epoch
/// link slot…`.
fn parse_node(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = fields.get(1)?.split(['@', ',']).next()?;
    let port = address.rsplit(':').next()?.parse().ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
            None => {
                let slot = range.parse().ok()?;
                Some((slot, slot))
            }
        })
        .collect();
    Some(ClusterNode {
        id: fields.first()?.to_string(),
        port,
        master: flags.contains("master"),
        failed: flags.contains("fail") && !flags.contains("fail?"),
        slots,
    })
}

/// A primary, its replicas and three sentinels watching them under the name `chat`.
pub struct Sentinels {
    /// The first primary, then its replicas.
    pub servers: Vec<Redis>,
    sentinels: Vec<(u16, Process, TempDir)>,
}

/// Lines of each sentinel's log shown when its test fails: what it saw and decided.
const SENTINEL_LOG_LINES: usize = 40;

impl Drop for Sentinels {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (port, _, dir) in &self.sentinels {
            let log = std::fs::read_to_string(dir.path().join("sentinel.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- sentinel (port {port}): last lines of its log ---");
            for line in &lines[lines.len().saturating_sub(SENTINEL_LOG_LINES)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The name the sentinels know the primary by.
pub const SENTINEL_SERVICE: &str = "chat";

impl Sentinels {
    /// Starts the primary, `replicas` replicas (synced), and three sentinels that agree on
    /// them all.
    pub fn start(replicas: usize) -> Sentinels {
        // Redis waits 5 s by default before a diskless full sync, for more replicas to join:
        // a server that rejoins as a replica would hold up every acknowledgement that long.
        let no_delay = ["--repl-diskless-sync-delay", "0"];
        let primary = Redis::start_with_args(Persistence::None, &no_delay);
        let primary_port = primary.port.to_string();
        let mut servers = vec![primary];
        for _ in 0..replicas {
            let replica = Redis::start_with_args(
                Persistence::None,
                &[&no_delay[..], &["--replicaof", "127.0.0.1", &primary_port]].concat(),
            );
            wait_until("the replica to sync", || {
                replica
                    .command(&["INFO", "replication"])
                    .is_ok_and(|info| info.contains("master_link_status:up"))
            });
            servers.push(replica);
        }
        let primary = &servers[0];
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = temp_dir("sentinel");
                let config = dir.path().join("sentinel.conf");
                // Down after a second, a quorum of two: failover tests stay short.
                std::fs::write(
                    &config,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                         sentinel failover-timeout {SENTINEL_SERVICE} 10000\n\
                         logfile {dir}/sentinel.log\n",
                        dir = dir.path().display(),
                        primary = primary.port,
                    ),
                )
                .expect("write sentinel.conf");
                let process = Process::spawn(
                    "redis-sentinel",
                    Command::new("redis-server")
                        .arg(&config)
                        .arg("--sentinel")
                        .stdout(Stdio::null()),
                );
                (port, process, dir)
            })
            .collect();
        let sentinels = Sentinels { servers, sentinels };
        let replicas = replicas.to_string();
        wait_until("every sentinel to know the replica and the others", || {
            sentinels.sentinels.iter().all(|(port, _, _)| {
                sentinel_command(*port, &["SENTINEL", "MASTER", SENTINEL_SERVICE]).is_ok_and(
                    |reply| {
                        master_field(&reply, "num-slaves") == Some(replicas.as_str())
                            && master_field(&reply, "num-other-sentinels") == Some("2")
                    },
                )
            })
        });
        sentinels
    }

    /// The port the sentinels say the primary is on now.
    pub fn primary_port(&self) -> Option<u16> {
        let (port, _, _) = self.sentinels.first()?;
        primary_named_by(*port)
    }
}

impl SharedRedis for Sentinels {
    /// `redis-sentinel://first?node=second&node=third&sentinelServiceName=chat`.
    fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|(port, _, _)| *port);
        let first = ports.next().expect("three sentinels");
        let others: String = ports
            .map(|port| format!("node=127.0.0.1:{port}&"))
            .collect();
        format!("redis-sentinel://127.0.0.1:{first}?{others}sentinelServiceName={SENTINEL_SERVICE}")
    }

    fn subscribed_rooms(&self) -> Vec<String> {
        self.current().subscribed_rooms()
    }

    fn subscribers(&self, room: &str) -> u64 {
        self.current().subscribers(room)
    }
}

impl Sentinels {
    /// The server that is the primary now.
    pub fn current(&self) -> &Redis {
        let port = self.primary_port();
        self.servers
            .iter()
            .find(|server| Some(server.port) == port)
            .unwrap_or(&self.servers[0])
    }

    /// Kills the primary (SIGKILL) and waits until the failover is over: every sentinel names
    /// the same replica in its place, has had an answer from it since (a sentinel that has not
    /// yet heard from the new primary within its down-after time starts another failover, and
    /// would promote whatever replica it then knows), and it answers as a primary.
    pub fn kill_primary(&mut self) -> u16 {
        let killed = self.kill_primary_now();
        wait_until(
            "every sentinel to name and reach the promoted replica",
            || {
                self.agreed_primary().is_some_and(|port| port != killed)
                    && self
                        .sentinels
                        .iter()
                        .all(|(port, _, _)| reaches_primary(*port))
                    && self
                        .current()
                        .command(&["ROLE"])
                        .is_ok_and(|role| role.starts_with("master"))
            },
        );
        self.current().port
    }

    /// Kills the primary (SIGKILL) and returns its port at once.
    pub fn kill_primary_now(&mut self) -> u16 {
        let killed = self.current().port;
        self.servers
            .iter_mut()
            .find(|server| server.port == killed)
            .expect("the primary")
            .kill();
        killed
    }

    /// The primary every sentinel names, if they all name the same.
    fn agreed_primary(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self
            .sentinels
            .iter()
            .map(|(port, _, _)| primary_named_by(*port))
            .collect();
        let first = *named.first()?;
        if named.iter().all(|port| *port == first) {
            first
        } else {
            None
        }
    }

    /// Starts the killed primary again (empty: no persistence) as a replica of the promoted
    /// one, as an orchestrator's start script does (Sentinel would convert it itself, but only
    /// after several of its 10 s checks), and waits until it is in sync with it.
    pub fn restart_killed(&mut self) {
        let primary = self
            .agreed_primary()
            .expect("the sentinels agree on the primary");
        let server = self
            .servers
            .iter_mut()
            .find(|server| !server.is_running())
            .expect("a killed server");
        server.restart();
        server
            .command(&["REPLICAOF", "127.0.0.1", &primary.to_string()])
            .expect("make it a replica");
        let restarted = server.port;
        let replica = self
            .servers
            .iter()
            .find(|server| server.port == restarted)
            .expect("the restarted server");
        wait_until(
            "the old primary to be in sync as the new one's replica",
            || {
                replica.command(&["INFO", "replication"]).is_ok_and(|info| {
                    info.contains(&format!("master_port:{primary}"))
                        && info.contains("master_link_status:up")
                })
            },
        );
        assert_eq!(
            self.agreed_primary(),
            Some(primary),
            "the sentinels still name the promoted replica"
        );
    }
}

/// The primary's port as the sentinel on `port` names it.
fn primary_named_by(port: u16) -> Option<u16> {
    let reply = sentinel_command(
        port,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE],
    )
    .ok()?;
    reply.lines().nth(1)?.parse().ok()
}

/// Whether the sentinel on `port` sees its primary up and has no ping to it unanswered.
fn reaches_primary(port: u16) -> bool {
    sentinel_command(port, &["SENTINEL", "MASTER", SENTINEL_SERVICE]).is_ok_and(|reply| {
        master_field(&reply, "flags") == Some("master")
            && master_field(&reply, "last-ping-sent") == Some("0")
    })
}

/// One field of a `SENTINEL MASTER` reply (a name line, then its value line).
fn master_field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = reply.lines();
    lines.position(|line| line == name)?;
    lines.next()
}

/// Asks the sentinel on `port`, with `redis-cli`.
fn sentinel_command(port: u16, args: &[&str]) -> Result<String, String> {
    super::redis_cli(port, &[], args)
}
