fn main() {
    println!("bertqa");
}
