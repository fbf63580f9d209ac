"""Compare an Autobahn TestSuite report (index.json) with the committed expected
results: every case of every agent must have its expected behaviour and close
behaviour, none may be FAILED, and no case may be missing or extra.

    python3 compare.py REPORT_INDEX EXPECTED [--update]

With --update, EXPECTED is rewritten from the report (after a deliberate change;
review the diff). Prints per-agent counts; exits 1 on any difference or FAILED.
"""
import collections
import json
import sys


def outcome(result):
    return {"behavior": result["behavior"], "behaviorClose": result["behaviorClose"]}


def case_key(case):
    return [int(part) for part in case.split(".")]


def main():
    report_path, expected_path = sys.argv[1], sys.argv[2]
    report = json.load(open(report_path))
    actual = {
        agent: {case: outcome(result) for case, result in sorted(cases.items(), key=lambda kv: case_key(kv[0]))}
        for agent, cases in sorted(report.items())
    }
    if "--update" in sys.argv[3:]:
        with open(expected_path, "w") as out:
            json.dump(actual, out, indent=1, sort_keys=False)
            out.write("\n")
        print(f"updated {expected_path}")
    expected = json.load(open(expected_path))
    problems = []
    for agent in sorted(set(expected) | set(actual)):
        want, got = expected.get(agent, {}), actual.get(agent, {})
        counts = collections.Counter(result["behavior"] for result in got.values())
        closes = collections.Counter(result["behaviorClose"] for result in got.values())
        print(
            f"{agent}: {len(got)} cases; behaviour "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + "; close behaviour "
            + ", ".join(f"{k} {v}" for k, v in sorted(closes.items()))
        )
        for case in sorted(set(want) | set(got), key=case_key):
            if case not in got:
                problems.append(f"{agent} {case}: expected {want[case]}, not run")
            elif case not in want:
                problems.append(f"{agent} {case}: {got[case]}, not in the expected results")
            elif got[case] != want[case]:
                problems.append(f"{agent} {case}: expected {want[case]}, got {got[case]}")
            if case in got and "FAILED" in got[case].values():
                problems.append(f"{agent} {case}: FAILED ({got[case]})")
    if problems:
        print("Autobahn results differ from the expected ones:")
        for problem in problems:
            print("  " + problem)
        return 1
    print("Autobahn results match the expected ones, 0 FAILED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
