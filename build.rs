//! One cfg for the choice between the Linux-native code (AF_PACKET ring, capabilities,
//! SIOCGIF* device queries) and the portable code every other system compiles:
//! `linux_native` is set for Linux targets unless the `portable` feature asks for the
//! portable code there too (which is how that code is built and tested on Linux).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linux_native)");
    println!("cargo::rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_FEATURE_PORTABLE").is_some();
    if linux && !portable {
        println!("cargo::rustc-cfg=linux_native");
    }
}
