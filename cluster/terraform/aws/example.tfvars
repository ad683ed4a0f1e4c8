region            = "us-east-1"
bucket_name       = "my-company-aiplatform"
prefix            = "aiplatform"
oidc_provider_arn = "arn:aws:iam::111122223333:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
