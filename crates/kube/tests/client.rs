//! `herald_kube::client()` where there is no Kubernetes configuration at all. The probe runs
//! in a child process of this test binary so that its environment can be set without touching
//! this process's (setting variables in a running, threaded test process is unsound).

use std::process::Command;

const CHILD: &str = "HERALD_KUBE_CLIENT_PROBE";

#[test]
fn without_configuration_the_error_names_what_was_tried() {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["client_probe", "--exact", "--ignored", "--nocapture"])
        .env(CHILD, "1")
        .env("KUBECONFIG", "/nonexistent/herald-kubeconfig")
        .env("HOME", "/nonexistent/home")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run the probe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "probe failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("client error: "))
        .unwrap_or_else(|| panic!("the probe printed no error:\n{stdout}\n{stderr}"));
    assert!(
        line.contains("no usable Kubernetes configuration"),
        "{line}"
    );
    assert!(
        line.contains("the kubeconfig named by KUBECONFIG (/nonexistent/herald-kubeconfig)"),
        "{line}"
    );
    assert!(
        line.contains("in-cluster service account (KUBERNETES_SERVICE_HOST is not set"),
        "{line}"
    );
}

/// Run only by the test above, in a child process with a prepared environment.
#[tokio::test]
#[ignore = "a probe run by without_configuration_the_error_names_what_was_tried"]
async fn client_probe() {
    assert_eq!(
        std::env::var(CHILD).as_deref(),
        Ok("1"),
        "run by its parent only"
    );
    match herald_kube::client().await {
        Ok(_) => panic!("a client was built without any configuration"),
        Err(message) => println!("client error: {message}"),
    }
}
