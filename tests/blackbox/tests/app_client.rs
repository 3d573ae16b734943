//! The application client (`herald_client::app`) against real processes:
//! every typed request and event against `herald dev`; a durable room whose
//! members' edge is killed with SIGKILL while another client publishes,
//! after which each member has every message exactly once and in order;
//! publishes made while offline, and one whose answer never came, stored
//! once; a token provider keeping a short-lived session going; `wss://`.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use herald_client::app::{
    Code, ConnectionEvent, Events, Herald, HistoryOptions, JoinOptions, Message, Options,
    PresenceChange, RoomEvent, State,
};
use herald_client::rustls;
use herald_test_support::{Herald as Process, Proxy, free_addr};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Generous: the machine may be loaded, and reconnects wait out backoff.
const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[namespaces.doc]
durable = { history_size = 1000, history_ttl = "1h" }

[namespaces.chat]

[namespaces.slow]

[namespaces.slow.limits]
publish_per_second = 1
publish_burst = 1
"#;

fn options(urls: &[String], user: &str) -> Options {
    Options::new(urls.to_vec())
        .token(token(user))
        .request_timeout(LONG)
        // Short delays: edges here come back within seconds.
        .reconnect(Duration::from_millis(100), Duration::from_secs(1))
}

async fn connected(options: Options) -> Herald {
    let herald = Herald::new(options).expect("valid options");
    tokio::time::timeout(LONG, herald.connect())
        .await
        .expect("connected in time")
        .expect("connected");
    herald
}

/// The next event that is a message.
async fn next_message(events: &mut Events<RoomEvent>) -> Message {
    loop {
        match tokio::time::timeout(LONG, events.next()).await {
            Ok(Some(RoomEvent::Message(m))) => return m,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the room's events ended"),
            Err(_) => panic!("no message within {LONG:?}"),
        }
    }
}

/// The next event of the room, whatever it is.
async fn next_event(events: &mut Events<RoomEvent>) -> RoomEvent {
    tokio::time::timeout(LONG, events.next())
        .await
        .expect("an event in time")
        .expect("the room's events go on")
}

async fn next_connection_event(events: &mut Events<ConnectionEvent>) -> ConnectionEvent {
    tokio::time::timeout(LONG, events.next())
        .await
        .expect("a connection event in time")
        .expect("the connection's events go on")
}

/// Asserts no further message arrives within [`QUIET`].
async fn no_more(events: &mut Events<RoomEvent>) {
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.next()).await {
        assert!(
            !matches!(e, RoomEvent::Message(_)),
            "unexpected extra {e:?}"
        );
    }
}

#[tokio::test]
async fn every_request_and_event_round_trips_against_herald_dev() {
    let (_f, config) = config_file(CONFIG);
    let dev = Dev::start_with(&config);
    let urls = [dev.ws()];
    let ann = Herald::new(options(&urls, "ann")).unwrap();
    assert_eq!(ann.state(), State::Idle);
    let mut ann_conn = ann.events();
    let hello = ann.connect().await.unwrap();
    assert_eq!(
        (hello.user.as_str(), ann.state()),
        ("ann", State::Connected)
    );
    assert!(hello.heartbeat_ms > 0 && hello.expires_at > now());
    assert!(matches!(
        next_connection_event(&mut ann_conn).await,
        ConnectionEvent::Connected(c) if c.conn == hello.conn
    ));
    let bob = connected(options(&urls, "bob")).await;

    // Ephemeral room: presence, messages, meta.
    let lobby = ann.room("chat:lobby");
    let mut lobby_events = lobby.events();
    let joined = lobby
        .join(JoinOptions {
            meta: Some(json!({"name": "Ann"})),
            since: None,
        })
        .await
        .unwrap();
    assert_eq!((joined.epoch.as_str(), joined.offset), ("", 0));
    assert!(lobby.joined());
    let RoomEvent::Presence(own) = next_event(&mut lobby_events).await else {
        panic!("ann's own join first")
    };
    assert_eq!(
        (own.user.as_str(), own.event),
        ("ann", PresenceChange::Join)
    );
    let bob_lobby = bob.room("chat:lobby");
    bob_lobby.join(JoinOptions::default()).await.unwrap();
    let RoomEvent::Presence(p) = next_event(&mut lobby_events).await else {
        panic!("bob's join")
    };
    assert_eq!((p.user.as_str(), p.event), ("bob", PresenceChange::Join));
    let published = bob_lobby.publish(json!({"text": "hi"})).await.unwrap();
    assert_eq!((published.epoch.as_str(), published.offset), ("", 0));
    let m = next_message(&mut lobby_events).await;
    assert_eq!((m.from.as_str(), &m.data), ("bob", &json!({"text": "hi"})));
    assert_eq!(m.position(), None);
    let mut members = lobby.presence().await.unwrap();
    members.sort_by(|a, b| a.user.cmp(&b.user));
    let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(users, ["ann", "bob"]);
    assert_eq!(members[0].meta, Some(json!({"name": "Ann"})));
    assert_eq!(members[0].connections[0].conn, hello.conn);
    bob_lobby.set_meta(json!({"typing": true})).await.unwrap();
    let RoomEvent::Presence(p) = next_event(&mut lobby_events).await else {
        panic!("bob's update")
    };
    assert_eq!(
        (p.event, p.meta),
        (PresenceChange::Update, Some(json!({"typing": true})))
    );

    // Durable room: offsets, history, read markers.
    let doc = ann.room("doc:1");
    let mut doc_events = doc.events();
    let joined = doc.join(JoinOptions::default()).await.unwrap();
    assert!(!joined.epoch.is_empty());
    let bob_doc = bob.room("doc:1");
    let mut offsets = Vec::new();
    for i in 0..3 {
        let p = bob_doc.publish(json!(i)).await.unwrap();
        assert_eq!(p.epoch, joined.epoch);
        offsets.push(p.offset);
    }
    for (i, offset) in offsets.iter().enumerate() {
        let m = next_message(&mut doc_events).await;
        assert_eq!((m.data, m.offset), (json!(i), Some(*offset)));
    }
    assert_eq!(doc.position().unwrap().offset, offsets[2]);
    let history = doc.history(HistoryOptions::default()).await.unwrap();
    assert_eq!(history.epoch, joined.epoch);
    let kept: Vec<Option<u64>> = history.messages.iter().map(|m| m.offset).collect();
    assert_eq!(kept, offsets.iter().map(|o| Some(*o)).collect::<Vec<_>>());
    let later = doc
        .history(HistoryOptions {
            since: Some(herald_client::app::Position {
                epoch: joined.epoch.clone(),
                offset: offsets[0],
            }),
            limit: Some(1),
        })
        .await
        .unwrap();
    assert_eq!(later.messages.len(), 1);
    assert_eq!(later.messages[0].offset, Some(offsets[1]));
    let marker = doc.mark_read(offsets[1]).await.unwrap();
    assert_eq!((marker.offset, marker.unread), (offsets[1], 1));
    loop {
        if let RoomEvent::Read(r) = next_event(&mut doc_events).await {
            assert_eq!(r, marker);
            break;
        }
    }
    assert_eq!(ann.unread("doc:1"), Some(1));
    bob_doc.publish(json!(3)).await.unwrap();
    next_message(&mut doc_events).await;
    assert_eq!(
        ann.unread("doc:1"),
        Some(2),
        "a new message counts as unread"
    );

    // Typed errors.
    let e = lobby.history(HistoryOptions::default()).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");
    let e = ann.room("user:bob").publish(json!(1)).await.unwrap_err();
    assert_eq!(e.code, Code::Forbidden, "{e}");
    let slow = ann.room("slow:1");
    slow.publish(json!(1)).await.unwrap();
    let e = slow.publish(json!(2)).await.unwrap_err();
    assert_eq!(e.code, Code::RateLimited, "{e}");
    assert!(e.retry_after_ms.is_some_and(|ms| ms > 0), "{e:?}");

    // Connection-level requests.
    ann.ping().await.unwrap();
    let expires_at = ann.refresh(&token("ann")).await.unwrap();
    assert!(expires_at > now(), "{expires_at}");
    let e = ann.refresh(&token("mallory")).await.unwrap_err();
    assert_eq!(e.code, Code::Forbidden, "another user's token: {e}");
    ann.ping().await.unwrap();

    // Leaving stops the messages.
    lobby.leave().await.unwrap();
    assert!(!lobby.joined());
    bob_lobby.publish(json!("gone")).await.unwrap();
    no_more(&mut lobby_events).await;
    let e = ann.room("user:ann").leave().await.unwrap_err();
    assert_eq!(e.code, Code::Forbidden);

    // Closing ends everything.
    ann.close().await;
    assert_eq!(ann.state(), State::Closed);
    let mut last = None;
    while let Some(e) = ann_conn.next().await {
        last = Some(e);
    }
    assert!(
        matches!(&last, Some(ConnectionEvent::Disconnected(d)) if d.code == Some(1000) && !d.will_reconnect),
        "{last:?}"
    );
    let e = doc.publish(json!("late")).await.unwrap_err();
    assert_eq!(e.code, Code::Closed);
    assert!(doc_events.next().await.is_none());

    // A refused token ends the client at once, with the server's code.
    let refused = Herald::new(Options::new(urls.to_vec()).token("not-a-jwt")).unwrap();
    let e = refused.connect().await.unwrap_err();
    assert_eq!(e.code, Code::Unauthorized, "{e}");
    assert_eq!(refused.state(), State::Closed);
}

/// Twenty members of a durable room on one edge, SIGKILLed while another
/// client publishes: each reconnects to the other edge and ends with every
/// message exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_every_message_once_and_in_order_across_an_edge_kill() {
    const MEMBERS: usize = 20;
    const BEFORE: usize = 40;
    const TOTAL: usize = 100;
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_with(2, &config);
    let urls = [cluster.ws(0), cluster.ws(1)];
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let herald = connected(options(&urls, &format!("member-{i}"))).await;
        assert_eq!(herald.node().as_deref(), Some("edge-0"));
        let room = herald.room("doc:kill");
        let events = room.events();
        let conn_events = herald.events();
        room.join(JoinOptions::default()).await.unwrap();
        members.push((herald, events, conn_events));
    }

    let publisher = connected(options(&[cluster.ws(1)], "publisher")).await;
    let (published_tx, mut published_rx) = mpsc::unbounded_channel();
    let (killed_tx, mut killed_rx) = mpsc::unbounded_channel::<()>();
    let publishing = tokio::spawn(async move {
        let room = publisher.room("doc:kill");
        let mut offsets = Vec::new();
        for i in 0..TOTAL {
            if i == BEFORE {
                let _ = published_tx.send(());
                killed_rx.recv().await;
            }
            offsets.push(room.publish(json!(i)).await.expect("publish").offset);
        }
        offsets
    });
    published_rx
        .recv()
        .await
        .expect("the first messages published");
    cluster.edges[0].kill();
    killed_tx.send(()).unwrap();
    let offsets = publishing.await.unwrap();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");

    let expected: Vec<(Value, Option<u64>)> =
        (0..TOTAL).map(|i| (json!(i), Some(offsets[i]))).collect();
    for (i, (herald, events, conn_events)) in members.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < TOTAL {
            let m = next_message(events).await;
            got.push((m.data, m.offset));
        }
        assert_eq!(got, expected, "member {i}");
        no_more(events).await;
        let ConnectionEvent::Disconnected(d) = next_connection_event(conn_events).await else {
            panic!("member {i}: a disconnect first")
        };
        assert!(d.will_reconnect, "member {i}: {d:?}");
        assert!(matches!(
            next_connection_event(conn_events).await,
            ConnectionEvent::Connected(c) if c.node == "edge-1"
        ));
        assert_eq!(herald.state(), State::Connected);
    }
}

/// Publishes made while the client cannot reach any edge wait in the
/// bounded queue (one more is refused) and go out after the reconnect,
/// each stored and delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_publishes_arrive_once_after_the_reconnect() {
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_with(2, &config);
    let observer = connected(options(&[cluster.ws(1)], "observer")).await;
    let watched = observer.room("doc:offline");
    let mut seen = watched.events();
    watched.join(JoinOptions::default()).await.unwrap();

    let writer = connected(options(&[cluster.ws(0)], "writer").offline_queue(2)).await;
    let mut writer_conn = writer.events();
    let room = writer.room("doc:offline");
    let mut own = room.events();
    room.join(JoinOptions::default()).await.unwrap();

    cluster.edges[0].kill();
    assert!(matches!(
        next_connection_event(&mut writer_conn).await,
        ConnectionEvent::Disconnected(d) if d.will_reconnect
    ));
    // Polled once each, so they are queued in this order before the third.
    let mut first = Box::pin(room.publish(json!("first")));
    let mut second = Box::pin(room.publish(json!("second")));
    assert!(futures::poll!(&mut first).is_pending());
    assert!(futures::poll!(&mut second).is_pending());
    let full = room.publish(json!("third")).await.unwrap_err();
    assert_eq!(full.code, Code::QueueFull, "{full}");
    assert_eq!(writer.state(), State::Reconnecting);

    cluster.replace_edge(0, "edge-0-again", Duration::from_secs(1));
    let offsets = [
        first.await.expect("the first queued publish").offset,
        second.await.expect("the second queued publish").offset,
    ];
    for events in [&mut seen, &mut own] {
        let texts: Vec<(Value, Option<u64>)> =
            [next_message(events).await, next_message(events).await]
                .into_iter()
                .map(|m| (m.data, m.offset))
                .collect();
        assert_eq!(
            texts,
            [
                (json!("first"), Some(offsets[0])),
                (json!("second"), Some(offsets[1]))
            ]
        );
        no_more(events).await;
    }
}

/// A publish whose answer never comes back (a link that stopped carrying
/// the edge's frames): the client notices the silence with its own ping,
/// reconnects to the other edge and sends the publish again with the same
/// key; the room stores it once and the answer carries that offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_answer_was_lost_is_stored_once() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        common: config,
        edge_args: vec!["--heartbeat".into(), "1s".into()],
        ..Spec::default()
    });
    let proxy = Proxy::start(cluster.edge_addrs[0], Duration::ZERO).await;
    let observer = connected(options(&[cluster.ws(1)], "observer")).await;
    let watched = observer.room("doc:lost");
    let mut seen = watched.events();
    watched.join(JoinOptions::default()).await.unwrap();

    let via_proxy = format!("ws://{}/ws", proxy.addr());
    let writer = connected(options(&[via_proxy, cluster.ws(1)], "writer")).await;
    assert_eq!(writer.node().as_deref(), Some("edge-0"));
    let mut writer_conn = writer.events();
    proxy.mute(true);
    let room = writer.room("doc:lost");
    let publishing = tokio::spawn(async move { room.publish(json!("once")).await });
    let stored = next_message(&mut seen).await;
    assert_eq!(stored.data, json!("once"));

    let ConnectionEvent::Disconnected(d) = next_connection_event(&mut writer_conn).await else {
        panic!("the silent connection is given up")
    };
    assert!(d.will_reconnect && d.code.is_none(), "{d:?}");
    assert!(d.reason.contains("ping"), "{d:?}");
    assert!(matches!(
        next_connection_event(&mut writer_conn).await,
        ConnectionEvent::Connected(c) if c.node == "edge-1"
    ));
    let published = publishing.await.unwrap().expect("the publish is answered");
    assert_eq!(Some(published.offset), stored.offset);
    no_more(&mut seen).await;
}

/// A token provider keeps a session going past its first token's `exp`:
/// the client refreshes on the same connection.
#[tokio::test]
async fn a_token_provider_refreshes_before_expiry() {
    let dev = Dev::start();
    let calls = Arc::new(AtomicU32::new(0));
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    let counted = calls.clone();
    let first_exp = now() + 6;
    let options = Options::new([dev.ws()])
        .token_provider(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let _ = asked_tx.send(n);
            async move { Ok(token_with(json!({"sub": "tess", "exp": now() + 6}))) }
        })
        .request_timeout(LONG);
    let tess = Herald::new(options).unwrap();
    let mut events = tess.events();
    let hello = tess.connect().await.unwrap();
    assert!(hello.expires_at <= first_exp + 1);
    assert!(matches!(
        next_connection_event(&mut events).await,
        ConnectionEvent::Connected(_)
    ));
    assert_eq!(asked.recv().await, Some(0));
    let refresh = tokio::time::timeout(LONG, asked.recv()).await;
    assert_eq!(refresh.unwrap(), Some(1), "the provider is asked again");
    // Past the first token's expiry (whole seconds), nothing happened to
    // the connection.
    let past = Duration::from_secs((first_exp + 2).saturating_sub(now()));
    let quiet = tokio::time::timeout(past, events.next()).await;
    assert!(quiet.is_err(), "{quiet:?}");
    tess.ping().await.unwrap();
    assert_eq!(tess.conn(), Some(hello.conn));
    assert!(tess.connected().unwrap().expires_at >= hello.expires_at);
}

/// A backend's disconnect that says not to come back closes the client.
#[tokio::test]
async fn a_disconnect_without_reconnect_closes_the_client() {
    let dev = Dev::start();
    let ben = connected(options(&[dev.ws()], "ben")).await;
    let mut events = ben.events();
    let mut router = dev.router().await;
    router
        .disconnect(herald_proto::v1::DisconnectRequest {
            target: Some(herald_proto::v1::disconnect_request::Target::User(
                "ben".into(),
            )),
            code: 4403,
            reason: "banned".into(),
            reconnect: None,
        })
        .await
        .unwrap();
    let ConnectionEvent::Disconnected(d) = next_connection_event(&mut events).await else {
        panic!("a disconnect")
    };
    assert_eq!(
        (d.code, d.reason.as_str(), d.will_reconnect),
        (Some(4403), "banned", false)
    );
    assert_eq!(ben.state(), State::Closed);
    let e = ben.ping().await.unwrap_err();
    assert_eq!(e.code, Code::Closed, "{e}");
    assert!(e.message.contains("banned"), "{e}");
}

fn self_signed() -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().clone(),
    )
}

#[tokio::test]
async fn wss_round_trip() {
    let (cert, key, der) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let addr: SocketAddr = free_addr();
    let args: Vec<String> = [
        "dev",
        "--listen",
        &addr.to_string(),
        "--grpc-listen",
        &free_addr().to_string(),
        "--jwt-secret",
        SECRET,
        "--tls-cert",
        &cert_path.display().to_string(),
        "--tls-key",
        &key_path.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    // Listening is enough: the client retries until the edge answers.
    let _dev = Process::start_until("herald dev (TLS)", &args, addr, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .expect("start herald dev with TLS");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let herald = connected(options(&[url], "tia").tls(Arc::new(tls))).await;
    let room = herald.room("chat:tls");
    let mut events = room.events();
    room.join(JoinOptions::default()).await.unwrap();
    room.publish(json!("over TLS")).await.unwrap();
    assert_eq!(next_message(&mut events).await.data, json!("over TLS"));
    herald.close().await;
}

/// Watching contacts with the application client: each transition comes
/// once as a `Status` event, and one that happened while the watcher's
/// edge was dead is told after the reconnect (the client watches again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_users_transitions_arrive_once_across_the_watchers_reconnect() {
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_spec(Spec {
        edges: 2,
        common: config,
        presence_args: vec!["--presence-grace".into(), "200ms".into()],
        ..Spec::default()
    });
    let urls = [cluster.ws(0), cluster.ws(1)];
    let watcher = connected(
        options(&urls, "wanda").token(token_with(json!({"sub": "wanda", "watch": ["friend-*"]}))),
    )
    .await;
    assert_eq!(watcher.node().as_deref(), Some("edge-0"));
    let mut events = watcher.events();
    let now = watcher.watch(&["friend-1"]).await.unwrap();
    assert_eq!(now.get("friend-1"), Some(&false), "{now:?}");
    let refused = watcher.watch(&["stranger"]).await.unwrap_err();
    assert_eq!(refused.code, Code::Forbidden, "{refused:?}");

    let friend = connected(options(&[cluster.ws(1)], "friend-1")).await;
    let status = |e: &ConnectionEvent| match e {
        ConnectionEvent::Status { user, online } => Some((user.clone(), *online)),
        _ => None,
    };
    let first = next_connection_event(&mut events).await;
    assert_eq!(status(&first), Some(("friend-1".into(), true)), "{first:?}");

    // The watcher's edge dies, and the friend leaves while it is away.
    cluster.edges[0].kill();
    friend.close().await;
    let mut seen = Vec::new();
    loop {
        let e = next_connection_event(&mut events).await;
        let done = status(&e) == Some(("friend-1".into(), false));
        seen.push(e);
        if done {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, ConnectionEvent::Connected(c) if c.node == "edge-1")),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter_map(status).count(), 1, "{seen:?}");
    // Told once: nothing more.
    let more = tokio::time::timeout(QUIET, events.next()).await;
    assert!(more.is_err(), "{more:?}");

    // Unwatched: the friend's next transition is not told.
    watcher.unwatch(&["friend-1"]).await.unwrap();
    let _back = connected(options(&[cluster.ws(1)], "friend-1")).await;
    let more = tokio::time::timeout(QUIET * 3, events.next()).await;
    assert!(more.is_err(), "{more:?}");
}

/// `echo: false`: the publisher's own connection does not get its message;
/// the same user's other device does.
#[tokio::test]
async fn a_publish_without_echo_skips_only_the_publishing_connection() {
    let (_f, config) = config_file(CONFIG);
    let dev = Dev::start_with(&config);
    let url = [format!("ws://{}/ws", dev.ws_addr)];
    let phone = connected(options(&url, "ed")).await;
    let laptop = connected(options(&url, "ed")).await;
    let (on_phone, on_laptop) = (phone.room("chat:echo"), laptop.room("chat:echo"));
    let (mut phone_events, mut laptop_events) = (on_phone.events(), on_laptop.events());
    on_phone.join(JoinOptions::default()).await.unwrap();
    on_laptop.join(JoinOptions::default()).await.unwrap();
    let options = herald_client::app::PublishOptions {
        echo: false,
        ..Default::default()
    };
    on_phone
        .publish_with(json!("quiet"), options)
        .await
        .unwrap();
    on_phone.publish(json!("loud")).await.unwrap();
    assert_eq!(next_message(&mut laptop_events).await.data, json!("quiet"));
    assert_eq!(next_message(&mut laptop_events).await.data, json!("loud"));
    assert_eq!(next_message(&mut phone_events).await.data, json!("loud"));
    no_more(&mut phone_events).await;
}
