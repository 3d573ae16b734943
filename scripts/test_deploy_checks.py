"""Self-test of scripts/deploy_checks.py: the checks pass on the real chart and
FAIL on a broken one. Each test copies the chart to a temporary folder, breaks
one thing, and runs the very functions scripts/check-deploy.sh runs.

Run by scripts/check-deploy.sh (alone: scripts/check-deploy.sh --self-test).
"""
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_checks as dc  # noqa: E402


class DeployChecks(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="herald-chart-"))
        self.chart = self.tmp / "herald"
        shutil.copytree(dc.CHART, self.chart)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def check(self, values=None, chart=None):
        return dc.check_chart(chart or self.chart, values, "self-test", set())

    def edit(self, relpath, old, new):
        path = self.chart / relpath
        text = path.read_text()
        self.assertIn(old, text, f"the self-test's edit no longer applies to {relpath}")
        path.write_text(text.replace(old, new, 1))

    def assertFailsWith(self, problems, *words):
        self.assertTrue(problems, "the checks passed a chart they must refuse")
        joined = "\n".join(problems)
        for w in words:
            self.assertIn(w, joined)

    # The real chart, the dev overlay and the base pass.
    def test_real_chart_passes_with_default_and_full_values(self):
        self.assertEqual(self.check(None, dc.CHART), [])
        self.assertEqual(self.check(dc.load_values(dc.FULL_VALUES), dc.CHART), [])

    def test_dev_overlay_and_base_pass(self):
        self.assertEqual(dc.check_dev(dc.DEV_OVERLAY, set()), [])
        self.assertEqual(dc.check_base_in_step(), [])

    # Broken templates.
    def test_template_syntax_error_fails(self):
        self.edit("templates/edge-deployment.yaml", '{{ include "herald.image" . }}', '{{ include "herald.image" . ')
        self.assertFailsWith(self.check(), "helm")

    def test_object_kubernetes_refuses_fails(self):
        # Renders fine as YAML; only the strict Kubernetes schema sees it.
        self.edit("templates/edge-deployment.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimit: 5\n  replica: 3")
        self.assertFailsWith(self.check(), "Deployment", "replica", "1.31.0")

    def test_mistyped_field_in_template_fails(self):
        self.edit("templates/router-service.yaml", "protocol: TCP", "protocol: TCP\n      port: fifty")
        self.assertFailsWith(self.check(), "Service", "fifty")

    def test_edge_without_component_label_fails(self):
        self.edit("templates/_helpers.tpl", "app.kubernetes.io/component: {{ .c }}\n{{- end -}}",
                  "app.kubernetes.io/role: {{ .c }}\n{{- end -}}")
        self.assertFailsWith(self.check(), "lack app.kubernetes.io/component=edge")

    # Values the schema must reject.
    def test_unknown_value_rejected(self):
        self.assertFailsWith(self.check({"edge": {"replicaCount": 3}}), "replicaCount", "helm lint", "helm render")

    def test_unknown_top_level_value_rejected(self):
        self.assertFailsWith(self.check({"natz": {"url": "nats://x:4222"}}), "natz")

    def test_mistyped_value_rejected(self):
        self.assertFailsWith(self.check({"edge": {"replicas": "3"}}), "/edge/replicas", "helm lint", "helm render")
        self.assertFailsWith(self.check({"nats": {"streamReplicas": "three"}}), "streamReplicas")

    def test_bad_enum_and_duration_rejected(self):
        self.assertFailsWith(self.check({"edge": {"ioUring": {"mode": "on"}}}), "mode")
        self.assertFailsWith(self.check({"edge": {"drain": {"window": "10 seconds"}}}), "window")

    def test_unknown_config_key_rejected(self):
        self.assertFailsWith(self.check({"config": {"namespaces": {"chat": {"presense": True}}}}), "presense")

    # Rules of the templates.
    def test_grace_period_shorter_than_drain_fails(self):
        self.assertFailsWith(self.check({"edge": {"terminationGracePeriodSeconds": 10}}),
                             "edge.terminationGracePeriodSeconds is 10", "at least 23")

    def test_public_key_mode_needs_a_key(self):
        self.assertFailsWith(self.check({"jwt": {"mode": "publicKey"}}), "jwt.publicKey")

    def test_config_numbers_stay_integers(self):
        docs = dc.render(dc.CHART, None)
        toml = [d for _, d in docs if d["kind"] == "ConfigMap" and "herald.toml" in d.get("data", {})][0]
        self.assertIn("history_size = 1000\n", toml["data"]["herald.toml"])

    # k8s/base out of step.
    def test_base_out_of_step_fails(self):
        stale = self.tmp / "herald.yaml"
        stale.write_text(dc.BASE_MANIFEST.read_text().replace("replicas: 3", "replicas: 4", 1))
        self.assertFailsWith(dc.check_base_in_step(dc.CHART, stale), "render-k8s.sh")
        self.edit("values.yaml", "heartbeat: 25s", "heartbeat: 30s")
        self.assertFailsWith(dc.check_base_in_step(self.chart, dc.BASE_MANIFEST), "not what the chart renders")

    # A value missing from the README's table.
    def test_undocumented_value_fails(self):
        self.assertEqual(dc.check_readme_values(self.chart), [])
        self.edit("values.yaml", "  heartbeat: 25s", "  heartbeat: 25s\n  newKnob: 1")
        self.assertFailsWith(dc.check_readme_values(self.chart), "edge.newKnob")

    # A broken dev overlay.
    def test_dev_overlay_with_invalid_object_fails(self):
        dev = self.tmp / "k8s"
        shutil.copytree(dc.REPO / "k8s", dev)
        nats = dev / "dev" / "nats.yaml"
        nats.write_text(nats.read_text().replace("podManagementPolicy: Parallel", "podManagementPolicy: Parallel\n  replica: 3", 1))
        orig = dc.REPO
        try:
            dc.REPO = self.tmp  # for the relative names in messages
            problems = dc.check_dev(dev / "dev", set())
        finally:
            dc.REPO = orig
        self.assertFailsWith(problems, "StatefulSet", "replica")


if __name__ == "__main__":
    unittest.main()
