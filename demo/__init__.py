"""The raresignal demo (``python -m raresignal.demo``, or ``make demo``): a rare skill is
learned, then lost, and the monitor's alert fires before it is gone.

``task`` holds the synthetic task and its model (the detection benchmark trains on it
too), ``training`` the Lightning pieces, ``app`` one run against a real server,
``report`` the PNG, and ``cli`` the command line.
"""
