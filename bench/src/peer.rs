//! `--target socketio`: the comparison peer ([`crate::socketio::SocketIoPeer`])
//! as a target of `idle` and `fanout`, measured like Herald: its servers'
//! CPU counts as the system's (`Role::Herald` in the CPU tables), Redis's
//! as the broker's (`Role::Nats`).
//!
//! Without `--redis-url` the peer gets a redis-server of its own on a free
//! port (no persistence), started before the Node servers and stopped after
//! them, so that Redis's memory and CPU are the run's alone and can be
//! charged to it like nats-server's to Herald.

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use crate::procfs::{kernel_release, version_of};
use crate::report::{CpuMeter, Labels};
use crate::socketio::{self, RedisServer, SocketIoPeer};
use crate::target::{CommonArgs, CpuProbe, Role};

pub struct Peer {
    /// Declared before `redis`: the servers stop before their Redis does.
    pub sio: SocketIoPeer,
    /// The run's own redis-server, unless `--redis-url` named another.
    redis: Option<RedisServer>,
}

impl Peer {
    /// Starts a redis-server (unless `--redis-url` is given), then
    /// `--edges` Socket.IO servers against it.
    pub fn start(common: &CommonArgs) -> Result<Peer> {
        if common.edges == 0 {
            anyhow::bail!("--edges must be at least 1");
        }
        let (redis, url) = match &common.redis_url {
            Some(url) => (None, url.clone()),
            None => {
                let bin = common
                    .redis_server
                    .clone()
                    .unwrap_or_else(socketio::redis_server_bin);
                let redis = RedisServer::start(&bin).with_context(|| {
                    format!(
                        "could not start {} for the Socket.IO peer \
                         (give --redis-server PATH, or --redis-url of a running Redis)",
                        bin.display()
                    )
                })?;
                let url = redis.url();
                (Some(redis), url)
            }
        };
        Ok(Peer {
            sio: SocketIoPeer::start(common.edges, &url)?,
            redis,
        })
    }

    /// One line saying what runs.
    pub fn describe(&self) -> String {
        format!(
            "socketio: {} Socket.IO 4 server(s) (Node, WebSocket only), Redis adapter, \
             Redis emitter as the publisher, {}",
            self.sio.pids().len(),
            match self.redis {
                Some(_) => "the run's own redis-server",
                None => "a Redis given by --redis-url",
            }
        )
    }

    /// The Redis server's pid: the run's own, or the one at `--redis-url`
    /// (`INFO server`), whose figures are the run's only if nothing else
    /// uses it.
    pub fn redis_pid(&self) -> Option<u32> {
        match &self.redis {
            Some(r) => Some(r.pid()),
            None => self.sio.redis_pid(),
        }
    }

    /// Whether the Redis is the run's own.
    pub fn owns_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Every process that serves the clients: the Socket.IO servers
    /// (`socketio-<i>`), then `redis-server` (if its pid is known).
    pub fn servers(&self) -> Vec<CpuProbe> {
        let mut probes: Vec<CpuProbe> = self
            .sio
            .pids()
            .into_iter()
            .map(|(name, pid)| CpuProbe {
                name,
                role: Some(Role::Herald),
                pid,
            })
            .collect();
        if let Some(pid) = self.redis_pid() {
            probes.push(CpuProbe {
                name: "redis-server".into(),
                role: Some(Role::Nats),
                pid,
            });
        }
        probes
    }

    /// The bench first, then [`Peer::servers`].
    pub fn cpu_probes(&self) -> Vec<CpuProbe> {
        let mut probes = vec![CpuProbe {
            name: "herald-bench (load)".into(),
            role: None,
            pid: std::process::id(),
        }];
        probes.extend(self.servers());
        probes
    }

    pub fn meter(&self) -> CpuMeter {
        CpuMeter::with_probes(self.cpu_probes(), None, Labels::SOCKETIO)
    }

    /// What Redis holds by its own account ([`socketio::redis_state`]).
    pub fn redis_state(&self) -> Option<Value> {
        socketio::redis_state(self.sio.redis_url())
    }

    /// Versions of the kernel, Node, redis-server and the pinned packages.
    pub fn versions(&self) -> Map<String, Value> {
        let mut v = Map::new();
        let mut put = |k: &str, x: Option<String>| {
            v.insert(k.into(), json!(x));
        };
        put("kernel", kernel_release());
        put("node", version_of(socketio::node_bin()));
        put(
            "redis-server",
            match &self.redis {
                Some(r) => r.version(),
                None => socketio::redis_version(self.sio.redis_url()),
            },
        );
        for package in ["socket.io", "@socket.io/redis-adapter", "redis"] {
            put(package, socketio::package_version(package));
        }
        v
    }

    /// Processes that have exited (they should all still run), with the end
    /// of their output.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = self.sio.exited();
        out.extend(self.redis.as_mut().and_then(RedisServer::died));
        out
    }
}
