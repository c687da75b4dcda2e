from compress_order.cli import entry

entry()
