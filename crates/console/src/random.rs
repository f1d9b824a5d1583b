//! Random ids: session ids, CSRF tokens, and the id each command form
//! carries (so that a form posted twice is one command).

/// 32 random bytes as hex.
pub fn id() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the system's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
