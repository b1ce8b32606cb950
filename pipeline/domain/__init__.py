"""The domain: the stock rules (:mod:`.core`, :mod:`.locations`) and the checkout saga
(:mod:`.saga`) as plain data and plain functions, with no Faust, Kafka or storage.
The agents feed them commands and write what they decide."""
