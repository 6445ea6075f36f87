@0xd1435c0f22e45302;
# Sample services of `captp serve`, called with `captp call`.

using Go = import "/go.capnp";
$Go.package("sample");
$Go.import("github.com/captp-go/captp/internal/sample");

# Echo answers with what it is sent.
interface Echo {
  echo @0 (text :Text) -> (text :Text);
  # name is the service's name.
  name @1 () -> (name :Text);
}

# Counter keeps a total that survives restarts of its vat.
interface Counter {
  add @0 (n :Int64) -> (total :Int64);
  get @1 () -> (total :Int64);
}
