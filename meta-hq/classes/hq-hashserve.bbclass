# Puts hq's client under the signature handlers that use a hash-equivalence server: each
# SignatureGenerator in bb.siggen's namespace built on SignatureGeneratorUniHashMixIn is
# replaced there by a subclass with the same name that reaches tcp:// and ipc:// addresses
# through hq's client (lib/hq_siggen). INHERIT classes are parsed after base.bbclass and every
# layer.conf, so OE-core's handlers are already in the namespace; bb.siggen.init() picks the
# handler only after that. Task signatures do not change.

HQ_SIGGEN_HANDLERS := "${@hq_siggen.install(d)}"
HQ_SIGGEN_HANDLERS[doc] = "The signature handlers that reach tcp:// and ipc:// addresses through hq's client."
