from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from medledger.contracts import cel_rules
from medledger.contracts.access import AccessRequest, decide
from medledger.errors import Conflict, MalformedTransaction, NotFound, RuleError, Unauthorized

from .conftest import Ledger


def _rule(
    rid: str, owner: str, expr: str, grantee: tuple[str, str] = ("org", "h2")
) -> dict[str, Any]:
    return {
        "id": rid,
        "owner": owner,
        "expression": expr,
        "grantee": {"kind": grantee[0], "id": grantee[1]},
    }


EXPLOSIVE = [
    # deeply nested comprehensions
    "patient.orgs.exists(a, patient.orgs.exists(b, patient.orgs.exists(c, a == b)))",
    # huge literals
    '"' + "x" * 500 + '" == record.id',
    "[" + ", ".join(str(i) for i in range(100)) + "].exists(x, x == record.version)",
    # exponential growth through chained maps
    'patient.orgs.map(x, x + x).map(y, y + y).exists(z, z == "")',
    # regex (backtracking), deep nesting, sheer size
    'record.id.matches("(a+)+$")',
    "(" * 200 + "true" + ")" * 200,
    " && ".join(["record.version > 0"] * 60),
    "x" * 2000,
]
BROKEN = [
    "record.resource_type ==",  # parse
    'record.colour == "red"',  # unknown field
    'record.version == "1"',  # type mismatch
    "record.version",  # not bool
    "secret == 1",  # undeclared variable
    '{"a": 1}.a == 1',  # maps
    "1.5 < 2.0",  # floats
    "",
]


@pytest.mark.parametrize("expr", EXPLOSIVE + BROKEN)
def test_bad_rules_are_rule_errors_and_change_nothing(ledger: Ledger, expr: str) -> None:
    pid = ledger.patient()
    err = ledger.reject(RuleError, pid, "rule.register", _rule("r", pid, expr))
    assert str(err).startswith("rule")


def test_rule_checker_never_crashes_on_garbage() -> None:
    for expr in [
        "\x00",
        "'''",
        "a.b.c.d()",
        "[[[[[",
        "has(record.id)",
        "record[0]",
        "-",
        "1 ? 2 : 3",
    ]:
        with pytest.raises(RuleError):
            cel_rules.check_rule(expr)


def test_rule_authority(ledger: Ledger) -> None:
    pid = ledger.patient("h1")
    expr = 'record.resource_type == "Observation"'
    ledger.reject(Unauthorized, "node:h1", "rule.register", _rule("r", pid, expr))
    ledger.reject(Unauthorized, "admin-h1", "rule.register", _rule("r", pid, expr))
    ledger.reject(Unauthorized, "admin-h2", "rule.register", _rule("r", "h1", expr))
    ledger.reject(NotFound, pid, "rule.register", _rule("r", pid, expr, ("org", "h9")))
    ledger.reject(
        MalformedTransaction, pid, "rule.register", _rule("r", pid, expr, ("patient", "x"))
    )
    ledger.submit(pid, "rule.register", _rule("r", pid, expr))
    ledger.reject(Conflict, pid, "rule.register", _rule("r", pid, expr))
    ledger.reject(Unauthorized, "admin-h1", "rule.remove", {"id": "r"})
    ledger.submit(pid, "rule.remove", {"id": "r"})
    assert ledger.get("rule/r") is None


def test_patient_rule_grants_access_org_rule_only_marks(ledger: Ledger) -> None:
    ledger.practitioner("h2", "doc-h2", ["physician"])
    ledger.practitioner("h3", "doc-h3", ["physician"])
    pid = ledger.patient("h1")
    ledger.submit(pid, "rule.register", _rule("share-labs", pid, 'record.category == "laboratory"'))
    ledger.submit(
        "admin-h1",
        "rule.register",
        _rule("wrap-h3", "h1", 'patient.orgs.exists(o, o == "h1")', ("org", "h3")),
    )
    ledger.submit(
        pid,
        "rule.register",
        _rule("boom", pid, "record.version / (record.version - 1) > 0", ("org", "h3")),
    )
    ledger.record("h1", pid, "lab1", "Observation", category="laboratory")
    ledger.record("h1", pid, "img1", "Observation", category="imaging")
    assert ledger.get("grant/lab1/org:h2")["basis"] == "patient"
    assert ledger.get("grant/img1/org:h2") is None
    assert ledger.get("grant/lab1/org:h3")["basis"] == "org"
    assert any(e["event"] == "rule.error" and e["rule"] == "boom" for e in ledger.events)
    t = ledger.time + 1

    def permit(actor: str, org: str, record: str) -> Any:
        return decide(
            ledger.state,
            AccessRequest(actor, org, pid, ("Observation",), "TREAT", t, record=record),
        )

    assert permit("doc-h2", "h2", "lab1").rule == "patient-rule"
    assert not permit("doc-h2", "h2", "img1").permit
    assert not permit("doc-h3", "h3", "lab1").permit  # org rules do not permit by themselves
    # an explicit consent deny beats the patient's own rule
    ledger.consent(
        pid,
        {
            "id": "no-h2",
            "patient": pid,
            "provision": {"type": "deny", "actors": [{"kind": "org", "id": "h2"}]},
        },
    )
    assert not permit("doc-h2", "h2", "lab1").permit
    # amending to a non-matching category removes the rule's grant; shredding removes all
    c = ledger.get("record/lab1")["commitment"]
    ledger.record("h1", pid, "lab1", "Observation", version=2, prev=c, category="imaging")
    assert ledger.get("grant/lab1/org:h2") is None
    ledger.submit("node:h1", "record.shred", {"record": "lab1"})
    assert ledger.get("grant/lab1/org:h3") is None


#: the variables of one record, as rules see them
RECORD = {
    "id": "r",
    "resource_type": "Observation",
    "category": "",
    "custodian": "h1",
    "version": 1,
    "effective": 0,
}


def test_evaluation_is_deterministic_and_bounded() -> None:
    rec = dict(RECORD)
    pat = {"id": "p", "orgs": ["h1", "h2"]}
    expr = (
        'patient.orgs.exists(o, patient.orgs.all(p, p != o || o.startsWith("h")))'
        " && size(record.category) == 0"
    )
    assert cel_rules.check_rule(expr).nodes <= cel_rules.MAX_NODES
    assert all(cel_rules.evaluate(expr, rec, pat) for _ in range(3))
    with pytest.raises(RuleError):
        cel_rules.evaluate("record.version * 9223372036854775807 * 4 > 0", rec, pat)


def test_a_checked_rule_is_kept_and_evaluates_afresh_for_every_record() -> None:
    expr = 'record.custodian == "h1" && "h2" in patient.orgs'
    first = cel_rules.check_rule(expr)
    assert cel_rules.check_rule(expr) is first  # parsed and checked once
    rec = dict(RECORD)
    # the kept program sees each evaluation's own variables, in any order
    verdicts = [
        cel_rules.evaluate(expr, {**rec, "custodian": custodian}, {"id": "p", "orgs": orgs})
        for custodian, orgs in [("h1", ["h2"]), ("h3", ["h2"]), ("h1", ["h1"]), ("h1", ["h2"])]
    ]
    assert verdicts == [True, False, False, True]
    # a rejected rule is not kept: it is refused every time
    for _ in range(2):
        with pytest.raises(RuleError, match="must evaluate to bool"):
            cel_rules.check_rule("record.version + 1")


def test_importing_the_command_line_does_not_build_the_cel_parser() -> None:
    # building celpy's parser costs more than importing the rest of the CLI: it waits
    # for the first rule
    code = (
        "import medledger.cli, medledger.contracts.cel_rules as c; "
        "assert c._env is None; c.check_rule('record.version > 0'); "
        "assert c._env is not None"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
