"""Analysis of finished runs: from their tidy rows to tables, figures and a report.

collect.py reads run folders; tables.py, bootstrap.py, pih.py and frontier.py compute; plots.py draws; report.py
writes the `analyze` report and a predict_only run's predictions; cli.py parses the five commands' arguments
(`compress-order table | analyze | collect | frontier | best`).
"""
