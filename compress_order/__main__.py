from compress_order.cli.main import entry

entry()
