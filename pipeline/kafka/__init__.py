"""The seam to Faust's and aiokafka's internals: nothing outside this package patches them."""
