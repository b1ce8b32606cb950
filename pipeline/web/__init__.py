"""What the workers serve over HTTP: health, stock and metrics views (:mod:`.views`),
the synchronous reserve API (:mod:`.reserve_api`, its pure rules in
:mod:`.reserve_rules`), live product pages (:mod:`.live`, ``static/``), and routing
of a query to the worker that owns its key (:mod:`.routing`)."""
