//! The gRPC API over mutual TLS (`--grpc-tls-cert`, `--grpc-tls-key`,
//! `--grpc-client-ca`): a backend with a certificate from the client CA
//! publishes; one without a certificate, with one from another CA, or in
//! plain text gets nothing through; an edge reads member lists from a
//! presence service that takes only such clients (`--presence https://…`
//! with `--presence-tls-*`); and the start-up lines say what is required.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use herald_ops::tls::{ALPN_H2, ClientTls, GrpcConnector};
use herald_proto::v1::router_client::RouterClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use serde_json::json;

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// Writes this CA's certificate and a certificate it signed for
    /// 127.0.0.1 (server and client use) with its key: (ca, cert, key).
    fn issue(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        let paths = (
            dir.join(format!("{name}-ca.crt")),
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&paths.0, self.0.pem()).unwrap();
        std::fs::write(&paths.1, cert.pem()).unwrap();
        std::fs::write(&paths.2, key.serialize_pem()).unwrap();
        paths
    }
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

async fn router_over(
    addr: std::net::SocketAddr,
    tls: ClientTls,
) -> RouterClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(GrpcConnector::new(tls));
    RouterClient::new(channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_clients_with_a_certificate_from_the_client_ca_reach_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, clients_ca, other_ca) = (Ca::new(), Ca::new(), Ca::new());
    let (trust, server_cert, server_key) = server_ca.issue(dir.path(), "server");
    let (client_ca, backend_cert, backend_key) = clients_ca.issue(dir.path(), "backend");
    let (_, edge_cert, edge_key) = clients_ca.issue(dir.path(), "edge");
    let (_, stranger_cert, stranger_key) = other_ca.issue(dir.path(), "stranger");
    let mtls = vec![
        "--grpc-tls-cert".to_string(),
        arg(&server_cert),
        "--grpc-tls-key".into(),
        arg(&server_key),
        "--grpc-client-ca".into(),
        arg(&client_ca),
    ];
    let mut cluster = Cluster::start_spec(Spec {
        edges: 0,
        router_args: mtls.clone(),
        presence_args: mtls,
        ..Spec::default()
    });
    cluster.add_edge_with(
        "edge-0",
        &[
            "--presence".into(),
            format!("https://{}", cluster.presence_grpcs[0]),
            "--presence-tls-ca".into(),
            arg(&trust),
            "--presence-tls-cert".into(),
            arg(&edge_cert),
            "--presence-tls-key".into(),
            arg(&edge_key),
        ],
    );
    let ann = connect(&cluster.ws(0), "ann").await;
    ok(&ann, json!({"op":"join","room":"chat:tls"})).await;
    // Read from the presence service over mutual TLS: the edge has no
    // other way to it.
    let members = ok(&ann, json!({"op":"presence","room":"chat:tls"})).await;
    assert_eq!(member_users(&members), ["ann"], "{members}");

    let backend =
        herald_ops::tls::client(&trust, Some((&backend_cert, &backend_key)), ALPN_H2).unwrap();
    let mut backend = router_over(cluster.router_grpc, backend).await;
    backend
        .publish(publish_request("chat:tls", "\"over mTLS\""))
        .await
        .expect("a backend with a certificate from the client CA publishes");
    assert_eq!(
        ann.recv_op("message", WAIT).await.unwrap()["data"],
        "over mTLS"
    );

    let no_cert = herald_ops::tls::client(&trust, None, ALPN_H2).unwrap();
    let stranger =
        herald_ops::tls::client(&trust, Some((&stranger_cert, &stranger_key)), ALPN_H2).unwrap();
    for (who, tls) in [
        ("no certificate", no_cert),
        ("another CA's certificate", stranger),
    ] {
        let e = router_over(cluster.router_grpc, tls)
            .await
            .publish(publish_request("chat:tls", "\"sneaked\""))
            .await
            .expect_err(who);
        // Refused by the transport (TLS 1.3 clients finish their side of the
        // handshake first, so they see either the server's alert or the
        // connection closing), never by a status from the API.
        assert!(
            matches!(
                e.code(),
                tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
            ),
            "{who}: {e:?}"
        );
    }
    // The router says why, for each.
    herald_test_support::eventually(WAIT, "the router to log both refusals", || {
        let refusals = cluster
            .router
            .output()
            .matches("gRPC: TLS handshake refused or failed")
            .count();
        async move { (refusals >= 2).then_some(()) }
    })
    .await;
    let plain = RouterClient::connect(format!("http://{}", cluster.router_grpc)).await;
    if let Ok(mut plain) = plain {
        plain
            .publish(publish_request("chat:tls", "\"plain\""))
            .await
            .expect_err("plain text");
    }
    // None of those reached the room: the next message is the backend's.
    backend
        .publish(publish_request("chat:tls", "\"after\""))
        .await
        .unwrap();
    assert_eq!(ann.recv_op("message", WAIT).await.unwrap()["data"], "after");

    for (service, output) in [
        ("the router", cluster.router.output()),
        ("the presence service", cluster.presences[0].output()),
    ] {
        assert!(
            output.contains(&format!(
                "the gRPC API of {service} is served over TLS (certificate {}) and takes only clients whose certificate a CA in {} signed",
                server_cert.display(),
                client_ca.display()
            )),
            "{output}"
        );
    }
}

#[test]
fn an_https_presence_url_without_a_ca_is_refused_in_plain_words() {
    let out = std::process::Command::new(herald_test_support::herald_bin())
        .args([
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--nats",
            "nats://127.0.0.1:1",
            "--presence",
            "https://127.0.0.1:1",
            "--jwt-secret",
            "a-secret-long-enough-for-the-check-0123456789",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("an https:// presence URL needs --presence-tls-ca"),
        "{err}"
    );
}
