//! The application's hooks (`herald.v1.Hooks`): a hook service written
//! here, served by tonic on a runtime of its own (so that the test can kill
//! it, connections and all), decides on connects, joins and publishes of
//! real edges. It refuses a user, grants a room at connect, denies a join,
//! rewrites and denies publishes, and stalls rooms named `*:slow`, so that
//! timeouts, `on_failure`, a dead service and the breaker can be watched.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_client::{Client, ClientError};
use herald_proto::v1::hooks_server::{Hooks, HooksServer};
use herald_proto::v1::{
    HookAllow, HookConnectAllow, HookConnectDeny, HookConnectReply, HookConnectRequest, HookDeny,
    HookJoinReply, HookJoinRequest, HookPublishAllow, HookPublishReply, HookPublishRequest,
    hook_connect_reply, hook_join_reply, hook_publish_reply,
};
use herald_test_support::{eventually, http_get};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

/// What the test application saw.
#[derive(Default)]
struct Seen {
    connects: Vec<HookConnectRequest>,
    joins: Vec<String>,
    /// `traceparent` metadata of the joins, when they carried one.
    join_traceparents: Vec<String>,
}

#[derive(Clone, Default)]
struct TestApp(Arc<Mutex<Seen>>);

/// Longer than any hook timeout of these tests.
const STALL: Duration = Duration::from_secs(30);

fn deny(code: &str, message: &str) -> HookDeny {
    HookDeny {
        code: code.into(),
        message: message.into(),
    }
}

#[tonic::async_trait]
impl Hooks for TestApp {
    async fn on_connect(
        &self,
        request: Request<HookConnectRequest>,
    ) -> Result<Response<HookConnectReply>, Status> {
        let r = request.into_inner();
        let outcome = match r.user.as_str() {
            "banned" => hook_connect_reply::Outcome::Deny(HookConnectDeny {
                code: 4403,
                reason: "banned by the test app".into(),
            }),
            "vip" => hook_connect_reply::Outcome::Allow(HookConnectAllow {
                rooms: vec!["chat:vip".into()],
                meta: r#"{"tier":"gold"}"#.into(),
            }),
            _ => hook_connect_reply::Outcome::Allow(HookConnectAllow::default()),
        };
        self.0.lock().unwrap().connects.push(r);
        Ok(Response::new(HookConnectReply {
            outcome: Some(outcome),
        }))
    }

    async fn on_join(
        &self,
        request: Request<HookJoinRequest>,
    ) -> Result<Response<HookJoinReply>, Status> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = request.into_inner();
        {
            let mut seen = self.0.lock().unwrap();
            seen.joins.push(r.room.clone());
            seen.join_traceparents.extend(traceparent);
        }
        if r.room.ends_with(":slow") {
            tokio::time::sleep(STALL).await;
        }
        let outcome = match r.room.as_str() {
            "chat:secret" => hook_join_reply::Outcome::Deny(deny("forbidden", "members only")),
            _ => hook_join_reply::Outcome::Allow(HookAllow {}),
        };
        Ok(Response::new(HookJoinReply {
            outcome: Some(outcome),
        }))
    }

    async fn on_publish(
        &self,
        request: Request<HookPublishRequest>,
    ) -> Result<Response<HookPublishReply>, Status> {
        let r = request.into_inner();
        if r.room.ends_with(":slow") {
            tokio::time::sleep(STALL).await;
        }
        let data: Value = serde_json::from_str(&r.data).map_err(|e| {
            Status::invalid_argument(format!("the edge sent data that is not JSON: {e}"))
        })?;
        let text = data["text"].as_str().unwrap_or_default();
        let outcome = if text.contains("spam") {
            hook_publish_reply::Outcome::Deny(deny("bad_request", "no spam, please"))
        } else if text.contains("darn") {
            let clean = json!({ "text": text.replace("darn", "****"), "moderated": true });
            hook_publish_reply::Outcome::Allow(HookPublishAllow {
                data: Some(clean.to_string()),
            })
        } else {
            hook_publish_reply::Outcome::Allow(HookPublishAllow { data: None })
        };
        Ok(Response::new(HookPublishReply {
            outcome: Some(outcome),
        }))
    }
}

/// The test application's hook service, on a runtime of its own.
struct HookService {
    addr: SocketAddr,
    app: TestApp,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HookService {
    fn start() -> HookService {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = TestApp::default();
        let service = HooksServer::new(app.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
        });
        HookService {
            addr,
            app,
            runtime: Some(runtime),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Gone at once, as with kill -9: its listener and every connection
    /// close, calls in flight are cut.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn joins(&self) -> Vec<String> {
        self.app.0.lock().unwrap().joins.clone()
    }
}

impl Drop for HookService {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `herald_hook_calls_total{hook,outcome}` as `http`'s `/metrics` says.
fn hook_calls(http: SocketAddr, hook: &str, outcome: &str) -> f64 {
    let (status, text) = http_get(http, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    let series = format!("herald_hook_calls_total{{hook=\"{hook}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Connects `user` with a `client` object in its `connect` frame; returns
/// the first frame the server sent, which must be `connected`.
async fn connect_as(url: &str, user: &str) -> (Client, Value) {
    let client = Client::open(url).await.unwrap();
    let connect =
        json!({"op":"connect","id":1,"token":token(user),"client":{"app":"hooks-test","v":2}});
    client.send_text(&connect.to_string()).await.unwrap();
    let first = client
        .next_frame(WAIT)
        .await
        .unwrap()
        .expect("an answer to connect");
    assert_eq!(first["op"], "connected", "the first frame: {first}");
    (client, first)
}

/// The scenario of the first two tests, on a cluster's edge or on `herald dev`.
async fn moderated_chat(url: &str, hooks: &HookService) {
    // Refused at connect, with the application's code and reason.
    match Client::connect(url, &token("banned")).await {
        Err(ClientError::Closed { code, reason }) => {
            assert_eq!(code, Some(4403), "{reason}");
            assert_eq!(reason, "banned by the test app");
        }
        Err(e) => panic!("banned was refused with {e}, not the hook's close"),
        Ok((_, frame)) => panic!("banned was let in: {frame}"),
    }

    // Granted a room at connect: in it before `connected`, without a join;
    // what the room sends (its own presence join) comes after `connected`.
    let (vip, connected) = connect_as(url, "vip").await;
    {
        let seen = hooks.app.0.lock().unwrap();
        let asked = seen.connects.iter().find(|c| c.user == "vip").unwrap();
        assert_eq!(asked.conn, connected["conn"].as_str().unwrap());
        assert_eq!(asked.node, connected["node"].as_str().unwrap());
        let client: Value = serde_json::from_str(&asked.client).unwrap();
        assert_eq!(client, json!({"app":"hooks-test","v":2}));
        let claims: Value = serde_json::from_str(&asked.claims).unwrap();
        assert_eq!(claims["sub"], "vip");
        assert!(
            asked.remote_addr.starts_with("127.0.0.1:"),
            "{}",
            asked.remote_addr
        );
    }
    let alice = connect(url, "alice").await;
    ok(&alice, json!({"op":"join","room":"chat:vip"})).await;
    ok(
        &alice,
        json!({"op":"publish","room":"chat:vip","data":{"text":"hello"}}),
    )
    .await;
    let msg = vip.recv_op("message", WAIT).await.unwrap();
    assert_eq!(msg["data"], json!({"text":"hello"}), "{msg}");
    let member = eventually(WAIT, "vip's granted membership is listed", || async {
        let reply = ok(&alice, json!({"op":"presence","room":"chat:vip"})).await;
        let vip = reply["members"]
            .as_array()?
            .iter()
            .find(|m| m["user"] == "vip")?
            .clone();
        Some(vip)
    })
    .await;
    assert_eq!(member["meta"], json!({"tier":"gold"}), "{member}");

    // A join denied with the application's code and message.
    let e = refused(
        &alice,
        json!({"op":"join","room":"chat:secret"}),
        "forbidden",
    )
    .await;
    assert_eq!(e["message"], "members only");

    // A publish rewritten: what is published, to every member, is the hook's.
    ok(
        &alice,
        json!({"op":"publish","room":"chat:vip","data":{"text":"darn it"}}),
    )
    .await;
    let rewritten = json!({"text":"**** it","moderated":true});
    for member in [&vip, &alice] {
        let msg = member.recv_op("message", WAIT).await.unwrap();
        if msg["data"]["text"] == "hello" {
            // alice's own copy of the first message.
            let msg = member.recv_op("message", WAIT).await.unwrap();
            assert_eq!(msg["data"], rewritten, "{msg}");
        } else {
            assert_eq!(msg["data"], rewritten, "{msg}");
        }
    }
    // A publish denied: nothing reaches the room.
    let e = refused(
        &alice,
        json!({"op":"publish","room":"chat:vip","data":{"text":"buy spam"}}),
        "bad_request",
    )
    .await;
    assert_eq!(e["message"], "no spam, please");
    no_more_messages(&vip).await;

    // A namespace without hooks is not asked about.
    ok(&alice, json!({"op":"join","room":"news:today"})).await;
    let joins = hooks.joins();
    assert!(joins.contains(&"chat:secret".to_string()), "{joins:?}");
    assert!(!joins.iter().any(|r| r.starts_with("news:")), "{joins:?}");
}

fn config(hooks: &HookService, timeout: &str) -> String {
    format!(
        "[connect_hook]\nendpoint = \"{url}\"\ntimeout = \"{timeout}\"\n\n\
         [namespaces.chat]\nhooks = {{ endpoint = \"{url}\", on = [\"join\", \"publish\"], timeout = \"{timeout}\" }}\n\n\
         [namespaces.news]\n",
        url = hooks.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_refuse_grant_deny_and_rewrite_on_a_cluster_edge() {
    let hooks = HookService::start();
    let (_file, args) = config_file(&config(&hooks, "5s"));
    let cluster = Cluster::start_with(1, &args);
    moderated_chat(&cluster.ws(0), &hooks).await;
    let edge = cluster.edge_addrs[0];
    assert!(hook_calls(edge, "publish", "rewritten") >= 1.0);
    assert!(hook_calls(edge, "connect", "denied") >= 1.0);
    assert!(hook_calls(edge, "join", "denied") >= 1.0);
    let (_, text) = http_get(edge, "/metrics").unwrap();
    for hook in ["connect", "join", "publish"] {
        let timed = format!("herald_hook_duration_seconds_count{{hook=\"{hook}\"}} ");
        assert!(text.contains(&timed), "no {timed} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_work_the_same_in_herald_dev() {
    let hooks = HookService::start();
    let (_file, args) = config_file(&config(&hooks, "5s"));
    let dev = Dev::start_with(&args);
    moderated_chat(&dev.ws(), &hooks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_timeout_denies_or_allows_as_configured() {
    let hooks = HookService::start();
    let url = hooks.url();
    let (_file, args) = config_file(&format!(
        "[namespaces.strict]\nhooks = {{ endpoint = \"{url}\", on = [\"join\", \"publish\"], timeout = \"300ms\", on_failure = \"deny\" }}\n\n\
         [namespaces.lenient]\nhooks = {{ endpoint = \"{url}\", on = [\"join\", \"publish\"], timeout = \"300ms\", on_failure = \"allow\" }}\n"
    ));
    let dev = Dev::start_with(&args);
    let alice = connect(&dev.ws(), "alice").await;

    let e = refused(
        &alice,
        json!({"op":"join","room":"strict:slow"}),
        "unavailable",
    )
    .await;
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("join hook did not answer within 300ms"),
        "{message}"
    );
    // The strict room was not joined.
    ok(&alice, json!({"op":"join","room":"strict:fast"})).await;
    let e = refused(
        &alice,
        json!({"op":"publish","room":"strict:slow","data":{"text":"x"}}),
        "unavailable",
    )
    .await;
    assert!(
        e["message"].as_str().unwrap().contains("publish hook"),
        "{e}"
    );

    ok(&alice, json!({"op":"join","room":"lenient:slow"})).await;
    ok(
        &alice,
        json!({"op":"publish","room":"lenient:slow","data":{"text":"as is"}}),
    )
    .await;
    let msg = alice.recv_op("message", WAIT).await.unwrap();
    assert_eq!(msg["room"], "lenient:slow");
    assert_eq!(msg["data"], json!({"text":"as is"}));
    assert_eq!(hook_calls(dev.ws_addr, "join", "timeout"), 2.0);
    assert_eq!(hook_calls(dev.ws_addr, "publish", "timeout"), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_hook_service_fails_within_the_timeout_and_stalls_no_other_namespace() {
    let mut hooks = HookService::start();
    let url = hooks.url();
    let (_file, args) = config_file(&format!(
        "[namespaces.chat]\nhooks = {{ endpoint = \"{url}\", on = [\"join\"], timeout = \"3s\", on_failure = \"deny\" }}\n\n\
         [namespaces.game]\nhooks = {{ endpoint = \"{url}\", on = [\"join\"], timeout = \"3s\", on_failure = \"allow\" }}\n\n\
         [namespaces.news]\n"
    ));
    let cluster = Cluster::start_with(1, &args);
    let edge = cluster.edge_addrs[0];
    let alice = connect(&cluster.ws(0), "alice").await;
    let bob = connect(&cluster.ws(0), "bob").await;
    ok(&alice, json!({"op":"join","room":"chat:a"})).await;

    // alice's join waits on a stalled hook; bob's requests in a namespace
    // without hooks are answered meanwhile.
    let stalled = alice.request_timeout(json!({"op":"join","room":"chat:slow"}), 2 * WAIT);
    tokio::pin!(stalled);
    let others = async {
        eventually(WAIT, "the hook holds alice's join", || async {
            hooks
                .joins()
                .contains(&"chat:slow".to_string())
                .then_some(())
        })
        .await;
        ok(&bob, json!({"op":"join","room":"news:x"})).await;
        ok(&bob, json!({"op":"publish","room":"news:x","data":{"n":1}})).await;
    };
    tokio::select! {
        reply = &mut stalled => panic!("alice's stalled join was answered first: {reply:?}"),
        () = others => {}
    }

    // The service dies: the call in flight is cut and answered by
    // `on_failure` (deny) before its timeout, not left to hang.
    hooks.kill();
    let reply = stalled.await.expect("a reply");
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("join hook failed"),
        "cut, not timed out: {message}"
    );

    // Dead: deny in chat, allow in game, news untouched.
    refused(&alice, json!({"op":"join","room":"chat:b"}), "unavailable").await;
    ok(&bob, json!({"op":"join","room":"game:1"})).await;
    ok(&bob, json!({"op":"join","room":"news:y"})).await;

    // After failures in a row the breaker opens: calls fail at once.
    for i in 0..5 {
        refused(
            &alice,
            json!({"op":"join","room":format!("chat:c{i}")}),
            "unavailable",
        )
        .await;
    }
    assert!(hook_calls(edge, "join", "circuit_open") >= 1.0);
    assert!(hook_calls(edge, "join", "error") >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn hook_calls_carry_the_trace_context_of_the_request() {
    let hooks = HookService::start();
    let (_file, mut args) = config_file(&config(&hooks, "5s"));
    // Spans are exported (nowhere that listens: the call's metadata is what is checked).
    args.extend([
        "--otlp-endpoint".to_string(),
        format!("http://{}", herald_test_support::free_addr()),
    ]);
    let dev = Dev::start_with(&args);
    let alice = connect(&dev.ws(), "alice").await;
    ok(&alice, json!({"op":"join","room":"chat:traced"})).await;
    let traceparents = hooks.app.0.lock().unwrap().join_traceparents.clone();
    assert_eq!(traceparents.len(), 1, "{traceparents:?}");
    let parts: Vec<&str> = traceparents[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparents:?}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
}

#[test]
fn bad_hook_settings_stop_the_start_in_plain_words() {
    for (config, needle) in [
        (
            "[namespaces.chat]\nhooks = { endpoint = \"http://127.0.0.1:7000\", on = [\"joins\"] }\n",
            "unknown variant `joins`",
        ),
        (
            "[namespaces.chat]\nhooks = { endpoint = \"http://127.0.0.1:7000\", on = [\"join\"], timeout = \"fast\" }\n",
            "hook timeout \"fast\" is not a duration",
        ),
        (
            "[connect_hook]\nendpoint = \"127.0.0.1:7000\"\n",
            "hook endpoint \"127.0.0.1:7000\": it must start with http://",
        ),
    ] {
        let (_file, args) = config_file(config);
        let out = std::process::Command::new(herald_test_support::herald_bin())
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{config}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{config}: {err}");
    }
}
