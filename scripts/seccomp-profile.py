#!/usr/bin/env python3
"""Writes charts/herald/files/seccomp-herald-io-uring.json: the container
runtimes' default seccomp profile plus the two io_uring calls the edge makes.

Input: `seccomp/default.json` of moby's `profiles` repository, the profile
Docker uses and containerd's RuntimeDefault follows. Its conditional rules
are resolved here for Herald's pods (every capability dropped; amd64, arm64
and their 32-bit modes), because a Localhost profile is read in the OCI
format, which has no conditions: a condition left in would be ignored and its
rule applied to everyone.

    python3 scripts/seccomp-profile.py default.json > charts/herald/files/seccomp-herald-io-uring.json
"""
import json
import sys

ARCHES = {"amd64", "x86", "x32", "arm64", "arm"}
SCMP_ARCHES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
IO_URING = ["io_uring_enter", "io_uring_setup"]  # what the edge calls; not io_uring_register


def applies(rule):
    inc, exc = rule.get("includes", {}), rule.get("excludes", {})
    if inc.get("caps"):
        return False  # needs a capability Herald's pods drop
    if inc.get("arches") and not ARCHES & set(inc["arches"]):
        return False
    if exc.get("arches") and ARCHES <= set(exc["arches"]):
        return False
    return True  # excludes.caps: applies, since the pods have no capability


def main(path):
    src = json.load(open(path))
    rules = []
    for rule in src["syscalls"]:
        if not applies(rule):
            continue
        out = {"names": sorted(rule["names"]), "action": rule["action"]}
        if "args" in rule:
            out["args"] = rule["args"]
        if "errnoRet" in rule:
            out["errnoRet"] = rule["errnoRet"]
        rules.append(out)
    allowed = {n for r in rules for n in r["names"]}
    assert not allowed & set(IO_URING), "the source already allows io_uring"
    rules.append({"names": IO_URING, "action": "SCMP_ACT_ALLOW"})
    profile = {
        "defaultAction": src["defaultAction"],
        "defaultErrnoRet": src.get("defaultErrnoRet", 1),
        "architectures": SCMP_ARCHES,
        "syscalls": rules,
    }
    json.dump(profile, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
