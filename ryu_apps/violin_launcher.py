"""``violin-controller``: start the violin_snapshot app on Ryu or, failing that, os-ken.

``ryu-manager violin_snapshot`` works as well once the set-up script has run;
this launcher adds ``--config`` (validated before anything starts) and runs on
os-ken, which ships no manager command of its own.
"""

import argparse
import os
import sys

import violin_ryu_compat


def build_args(argv):
    parser = argparse.ArgumentParser(prog="violin-controller", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="controller config file (JSON or YAML); see docs/configuration.md")
    parser.add_argument("--ofp-listen-host", default="", help="OpenFlow listen address (default: all)")
    parser.add_argument("--ofp-tcp-listen-port", type=int, default=6653, help="OpenFlow port (default 6653)")
    parser.add_argument("--wsapi-host", default="127.0.0.1", help="REST listen address (default 127.0.0.1)")
    parser.add_argument("--wsapi-port", type=int, default=8080, help="REST port (default 8080)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--framework", choices=("auto", "ryu", "os_ken"), default="auto",
                        help="which OpenFlow framework to run on (default: ryu if installed)")
    return parser.parse_args(argv)


def framework_args(args):
    argv = ["--ofp-tcp-listen-port", str(args.ofp_tcp_listen_port),
            "--wsapi-host", args.wsapi_host, "--wsapi-port", str(args.wsapi_port)]
    if args.ofp_listen_host:
        argv += ["--ofp-listen-host", args.ofp_listen_host]
    if args.verbose:
        argv.append("--verbose")
    return argv


def main(argv=None):
    args = build_args(sys.argv[1:] if argv is None else argv)
    if args.config:
        from violin_core.config import ConfigError, load
        try:
            load(args.config)
        except ConfigError as exc:
            print("violin-controller: %s" % exc, file=sys.stderr)
            return 2
        os.environ["VIOLIN_CONFIG"] = os.path.abspath(args.config)
    violin_ryu_compat.install()
    framework = args.framework
    if framework == "auto":
        try:
            import ryu.cmd.manager  # noqa: F401
            framework = "ryu"
        except ImportError:
            framework = "os_ken"
    if framework == "ryu":
        from ryu.cmd import manager
        manager.main(args=framework_args(args) + ["violin_snapshot"], prog="violin-controller")
        return 0
    return run_os_ken(args)


def run_os_ken(args):
    from oslo_config.cfg import DuplicateOptError
    from os_ken import cfg
    from os_ken.lib import hub
    hub.patch(thread=False)
    from os_ken.base.app_manager import AppManager
    conf = cfg.CONF
    for opt in (cfg.StrOpt("wsapi-host", default="127.0.0.1"), cfg.IntOpt("wsapi-port", default=8080)):
        try:
            conf.register_cli_opt(opt)
        except DuplicateOptError:
            pass
    conf(args=framework_args(args), project="os_ken")
    manager = AppManager.get_instance()
    manager.load_apps(["violin_snapshot"])
    services = manager.instantiate_apps(**manager.create_contexts())
    try:
        hub.joinall(services)
    except KeyboardInterrupt:
        pass
    finally:
        manager.close()
    # os-ken's native hub threads are not daemons: without this, Ctrl-C would leave the process up.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
