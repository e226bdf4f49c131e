# Writes alerts_test.yaml (promtool unit tests of alerts.yaml) from the cases in
# alerts_test_cases.yaml, written there by hand; severities and descriptions are
# copied from alerts.yaml. After editing either: python3 deploy/prometheus/gen_alerts_test.py
# (needs PyYAML), then scripts/check-deploy.sh runs them with promtool.
import os, yaml
HERE = os.path.dirname(os.path.abspath(__file__))
def load(name):
    return yaml.safe_load(open(os.path.join(HERE, name)))
rules = {r['alert']: r for g in load('alerts.yaml')['groups'] for r in g['rules']}

def expected(name, fire):
    """One alert a check expects: its labels plus the rule's severity, its summary plus the rule's description."""
    r = rules[name]
    labels = dict(fire['labels'], severity=r['labels']['severity'])
    return {'exp_labels': labels, 'exp_annotations': {'summary': fire['summary'], 'description': r['annotations']['description']}}

def check(c):
    return {'eval_time': c['at'], 'alertname': c['alert'], 'exp_alerts': [expected(c['alert'], f) for f in c.get('fires', [])]}

def test(case):
    return {'name': case['name'], 'interval': '1m',
            'input_series': [{'series': s, 'values': v} for s, v in case['series'].items()],
            'alert_rule_test': [check(c) for c in case['checks']]}

tests = [test(case) for case in load('alerts_test_cases.yaml')]

# every alert must be tested firing
fired = {t['alertname'] for c in tests for t in c['alert_rule_test'] if t['exp_alerts']}
missing = set(rules) - fired
assert not missing, missing
out = {'rule_files': ['alerts.yaml'], 'evaluation_interval': '1m', 'tests': tests}
class D(yaml.SafeDumper): pass
D.add_representer(str, lambda d, s: d.represent_scalar('tag:yaml.org,2002:str', s, style="'" if any(c in s for c in '{}"=+') else None))
hdr = ("# promtool unit tests of alerts.yaml: each alert fires on realistic series and\n"
       "# stays quiet on healthy ones. Run: promtool test rules deploy/prometheus/alerts_test.yaml\n"
       "# (scripts/check-deploy.sh does). 'name' says what each case shows.\n")
open(os.path.join(HERE, 'alerts_test.yaml'), 'w').write(hdr + yaml.dump(out, Dumper=D, sort_keys=False, width=200))
