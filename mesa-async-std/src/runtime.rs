//! One [`mesa_driver::Runtime`] per executor, written once: the runtimes differ only
//! in how they spawn; clock, timer and sockets are async-io's for both.

/// Define a runtime type spawning with `spawn`, its `Runtime` impl, and its module of
/// the runtime's server, client and portal API (`mesa_driver::runtime_api!`), all
/// behind `feature`.
macro_rules! runtime {
    (
        $(#[$doc:meta])*
        feature = $feature:literal,
        runtime = $runtime:ident,
        module = $module:ident,
        name = $name:literal,
        spawn = |$future:ident| $spawn:expr,
    ) => {
        $(#[$doc])*
        #[cfg(feature = $feature)]
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $runtime;

        #[cfg(feature = $feature)]
        impl $crate::mesa_driver::Runtime for $runtime {
            type TcpStream = ::async_net::TcpStream;
            type TcpListener = ::async_net::TcpListener;
            type Sleep = $crate::Sleep;

            fn now(&self) -> ::std::time::Instant {
                // async-io's timers run on the standard clock.
                ::std::time::Instant::now()
            }

            fn sleep_until(&self, deadline: ::std::time::Instant) -> $crate::Sleep {
                $crate::Sleep::until(deadline)
            }

            fn spawn<F>(&self, $future: F)
            where
                F: ::std::future::Future<Output = ()> + Send + 'static,
            {
                $spawn;
            }

            fn bind(
                &self,
                addr: ::std::net::SocketAddr,
            ) -> impl ::std::future::Future<Output = ::std::io::Result<::async_net::TcpListener>> + Send
            {
                ::async_net::TcpListener::bind(addr)
            }

            fn local_addr(
                &self,
                listener: &::async_net::TcpListener,
            ) -> ::std::io::Result<::std::net::SocketAddr> {
                listener.local_addr()
            }

            fn accept(
                &self,
                listener: &::async_net::TcpListener,
            ) -> impl ::std::future::Future<
                Output = ::std::io::Result<(::async_net::TcpStream, ::std::net::SocketAddr)>,
            > + Send {
                $crate::net::accept(listener)
            }

            fn connect(
                &self,
                addr: &str,
            ) -> impl ::std::future::Future<Output = ::std::io::Result<::async_net::TcpStream>> + Send
            {
                $crate::net::connect(addr)
            }
        }

        #[doc = concat!(
            "Mesa on ", $name, ": servers, clients and portals whose tasks run on [`",
            stringify!($runtime), "`]; what does not depend on the runtime (`Client`, ",
            "handlers, `Dispatcher`, …) is at the crate root."
        )]
        #[cfg(feature = $feature)]
        pub mod $module {
            use $crate::$runtime;

            $crate::mesa_driver::runtime_api!($runtime, $name);
        }
    };
}
