//! `--target socketio`: the comparison peer ([`crate::socketio::SocketIoPeer`])
//! as a target of `idle` and `fanout`, measured like Herald: its servers'
//! CPU counts as the system's (`Role::Herald` in the CPU tables), Redis's
//! as the broker's (`Role::Nats`).

use anyhow::Result;

use crate::report::{CpuMeter, Labels};
use crate::socketio::SocketIoPeer;
use crate::target::{CommonArgs, CpuProbe, Role};

pub struct Peer {
    pub sio: SocketIoPeer,
}

impl Peer {
    /// Starts `--edges` Socket.IO servers against `--redis-url`.
    pub fn start(common: &CommonArgs) -> Result<Peer> {
        if common.edges == 0 {
            anyhow::bail!("--edges must be at least 1");
        }
        Ok(Peer {
            sio: SocketIoPeer::start(common.edges, &common.redis_url)?,
        })
    }

    /// One line saying what runs.
    pub fn describe(&self) -> String {
        format!(
            "socketio: {} Socket.IO 4 server(s) (Node, WebSocket only), Redis adapter, \
             Redis emitter as the publisher",
            self.sio.pids().len()
        )
    }

    /// The bench first, then the servers, then Redis (if its pid is known).
    pub fn cpu_probes(&self) -> Vec<CpuProbe> {
        let mut probes = vec![CpuProbe {
            name: "herald-bench (load)".into(),
            role: None,
            pid: std::process::id(),
        }];
        probes.extend(self.sio.pids().into_iter().map(|(name, pid)| CpuProbe {
            name,
            role: Some(Role::Herald),
            pid,
        }));
        if let Some(pid) = self.sio.redis_pid() {
            probes.push(CpuProbe {
                name: "redis-server".into(),
                role: Some(Role::Nats),
                pid,
            });
        }
        probes
    }

    pub fn meter(&self) -> CpuMeter {
        CpuMeter::with_probes(self.cpu_probes(), None, Labels::SOCKETIO)
    }
}
