"""The `violin` CLI (cli) and the one client of the controller's REST API (api: ApiClient, wait_until_done)
that the CLI, the scripts and the tests use. Standard library only: it imports neither Ryu nor violin_core."""
